"""Stage `evaluate`: the fp32 model and every int8 variant that quantize wrote, scored on the same
fixed validation windows (loss, perplexity, bits per byte, the change against fp32), with their
file sizes, their generation speed and seeded sample generations, as report.json and report.md.

Models: "fp32" (train's model.safetensors), "int8" (dynamic int8, model-int8.safetensors) and
"int8-wo" (weight-only int8, model-int8-wo.safetensors), each when its file exists; the report
names the ones that are absent.

Bits per byte divide by the UTF-8 bytes of the validation text (tokenize's meta.json), so
models with different tokenizers compare fairly. Prompts are encoded after an EOS because in
the training stream every document follows one: the prompt then reads as a document start.

Optional external texts (`external`: .txt files, each one document, or .jsonl files with a
`text` field per line) are tokenized with the artifact's tokenizer into the training stream's
shape (EOS, doc, EOS, doc, EOS...), cut into non-overlapping windows of the model's context like
the validation windows, and every token is scored once; their bits per byte divide by those
texts' own UTF-8 bytes. Relative paths are taken from the working directory. The files are read
when the stage runs: the stage's cache key holds their paths, not their contents.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from ember.model.checkpoint import WEIGHTS, load_model, read_config
from ember.model.decoding import use_decoding_layout
from ember.model.generate import generate
from ember.model.quantize import INT8_WEIGHTS, WO_INT8_WEIGHTS, load_int8, load_weight_only_int8
from ember.model.scoring import eval_loss, stream_windows, token_stream, total_nats
from ember.model.tokenizer import load_tokenizer
from ember.model.transformer import Transformer
from ember.storage.tokens import TokenStream, bits_per_byte, read_meta
from ember.tasks.stage import Stage, StageContext

# name in the report -> (file in the quantize artifact, loader, what it is)
QUANTIZED: dict[str, tuple[str, Callable[[Path], Transformer], str]] = {
    "int8": (INT8_WEIGHTS, load_int8, "dynamic int8"),
    "int8-wo": (WO_INT8_WEIGHTS, load_weight_only_int8, "weight-only int8"),
}
SPEED_REPEATS = 3


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval_batches: int = Field(20, gt=0, description="validation batches (fixed windows, the same for every model)")
    batch_size: int = Field(8, gt=0, description="windows of max_seq_len tokens per batch")
    prompts: list[str] = Field(
        ["Once upon a time", "The king said", "It was a dark and stormy night"], description="sample generation prompts"
    )
    max_new_tokens: int = Field(80, ge=0, description="tokens generated per prompt")
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: int | None = Field(50, gt=0, description="sample among the k likeliest tokens; None = all")
    seed: int = Field(
        1234, ge=0, description="sampling seed of the first prompt (+1 for each next one), the same for every model"
    )
    speed_tokens: int = Field(
        64,
        ge=0,
        description="generation speed: greedy tokens (batch 1, KV cache, no EOS "
        "stop) timed per model after a warm-up, median of 3; 0 = skip",
    )
    external: list[str] = Field(
        [],
        description="extra evaluation texts: .txt (one document each) or .jsonl "
        "(a `text` field per line) paths, scored like the validation "
        "windows, bits per byte over their own UTF-8 bytes",
    )
    external_max_tokens: int = Field(
        100_000, gt=0, description="tokens scored per external file at most (the first ones)"
    )


# -- scoring -----------------------------------------------------------------------------------------


def _scores(
    model: torch.nn.Module, windows: npt.NDArray[np.int64] | None, batch_size: int, meta: dict[str, Any]
) -> dict[str, float | None]:
    if windows is None:
        return {"val_loss": None, "perplexity": None, "bpb": None, "seconds": 0.0}
    started = time.monotonic()
    loss = eval_loss(model, windows, batch_size)
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bpb": bits_per_byte(loss, meta),
        "seconds": round(time.monotonic() - started, 2),
    }


def _delta(score: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """The change against fp32 (None where a figure is missing)."""
    if score["val_loss"] is None or base["val_loss"] is None:
        return {"delta_loss": None, "delta_bpb": None, "delta_relative": None}
    return {
        "delta_loss": score["val_loss"] - base["val_loss"],
        "delta_bpb": score["bpb"] - base["bpb"] if score["bpb"] is not None and base["bpb"] is not None else None,
        "delta_relative": (score["val_loss"] - base["val_loss"]) / base["val_loss"],
    }


def generation_speed(model: Transformer, prompt_ids: list[int], new_tokens: int) -> float | None:
    """Tokens per second of greedy generation, batch 1, after a warm-up; the median of a few runs."""
    if new_tokens <= 0:
        return None
    list(generate(model, prompt_ids, min(8, new_tokens), temperature=0))  # first calls, allocations
    speeds: list[float] = []
    for _ in range(SPEED_REPEATS):
        started = time.perf_counter()
        n = sum(1 for _ in generate(model, prompt_ids, new_tokens, temperature=0))
        speeds.append(n / (time.perf_counter() - started))
    return round(statistics.median(speeds), 1)


def _samples(model: Transformer, tokenizer: Tokenizer, cfg: EvaluateConfig, eos_id: int) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    for i, prompt in enumerate(cfg.prompts):
        ids = [eos_id] + tokenizer.encode(prompt, add_special_tokens=False).ids
        started = time.monotonic()
        new = list(
            generate(
                model,
                ids,
                cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                eos_id=eos_id,
                seed=cfg.seed + i,
            )
        )
        seconds = time.monotonic() - started
        samples.append(
            {
                "prompt": prompt,
                "completion": tokenizer.decode(new),
                "tokens": len(new),
                "tokens_per_s": round(len(new) / seconds, 1) if new and seconds > 0 else None,
            }
        )
    return samples


# -- external texts ------------------------------------------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """The documents of one external file: a .jsonl file's `text` fields, else the whole file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluate.external file not found")
    try:
        if path.suffix != ".jsonl":
            return [path.read_text(encoding="utf-8")]
        texts: list[str] = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}: line {n}: not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}: line {n}: no string `text` field")
                texts.append(record["text"])
        return texts
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def evaluate_external(
    path: Path, texts: list[str], models: dict[str, Transformer], tokenizer: Tokenizer, eos_id: int, cfg: EvaluateConfig
) -> dict[str, Any]:
    seq_len = models["fp32"].config.max_seq_len
    stream, n_bytes, docs = token_stream(texts, tokenizer, eos_id, cfg.external_max_tokens)
    scores: dict[str, dict[str, float]] = {}  # model -> loss, perplexity, bpb, delta_bpb
    result = {
        "path": str(path),
        "docs": len(texts),
        "docs_scored": docs,
        "tokens": len(stream) - 1,
        "bytes": n_bytes,
        "models": scores,
    }
    if len(stream) < 2 or n_bytes == 0:
        return result
    x, y = stream_windows(stream, seq_len)
    for name, model in models.items():
        nats = total_nats(model, x, y, cfg.batch_size)
        loss = nats / (len(stream) - 1)
        scores[name] = {"loss": loss, "perplexity": math.exp(loss), "bpb": nats / math.log(2) / n_bytes}
    base = scores["fp32"]["bpb"]
    for score in scores.values():
        score["delta_bpb"] = score["bpb"] - base
    return result


# -- the stage ---------------------------------------------------------------------------------------


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict[str, Any]:
    model_dir, quant_dir = Path(ctx.inputs["train"]), Path(ctx.inputs["quantize"])
    tokens_dir = Path(ctx.inputs["tokenize"])
    # External files first: a missing one should fail before minutes of scoring.
    external_texts = {Path(p): read_texts(Path(p)) for p in cfg.external}
    meta = read_meta(tokens_dir)
    _, config = read_config(model_dir)
    eos_id = int(config.get("tokenizer", {}).get("eos_id", meta.get("eos_id", 2)))
    tokenizer = load_tokenizer(Path(ctx.inputs["train_tokenizer"]))

    models = {"fp32": load_model(model_dir)}
    files = {"fp32": model_dir / WEIGHTS}
    absent: dict[str, str] = {}
    for name, (file, load, what) in QUANTIZED.items():
        if (quant_dir / file).exists():
            models[name], files[name] = load(quant_dir), quant_dir / file
        else:
            absent[name] = f"no {file} in the quantize artifact ({what} not made)"
            ctx.log.warning("%s: no %s; %s is not evaluated", quant_dir, file, name)
    for model in models.values():  # as the demo serves them: the speed figure is the demo's
        use_decoding_layout(model)
    seq_len = models["fp32"].config.max_seq_len
    val = TokenStream(tokens_dir / "val", meta.get("dtype"))
    windows = val.fixed_windows(cfg.eval_batches * cfg.batch_size, seq_len)
    if windows is None:
        ctx.log.warning("%s: no validation shard holds %d tokens; no loss figures", val.folder, seq_len + 1)

    speed_prompt = [eos_id] + (tokenizer.encode(cfg.prompts[0], add_special_tokens=False).ids if cfg.prompts else [])
    scores: dict[str, dict[str, Any]] = {}  # model -> its figures (report.json)
    for name, model in models.items():
        ctx.report.progress(len(scores), len(models), "evaluate models")
        scores[name] = {
            **_scores(model, windows, cfg.batch_size, meta),
            "file": files[name].name,
            "file_bytes": files[name].stat().st_size,
            "tokens_per_s": generation_speed(model, speed_prompt, cfg.speed_tokens),
        }
    for name in scores:
        scores[name].update(_delta(scores[name], scores["fp32"]))
    samples = {name: _samples(model, tokenizer, cfg, eos_id) for name, model in models.items()}
    external = [
        evaluate_external(path, texts, models, tokenizer, eos_id, cfg) for path, texts in external_texts.items()
    ]

    report = {
        "val": {
            "windows": 0 if windows is None else len(windows),
            "seq_len": seq_len,
            "tokens": 0 if windows is None else len(windows) * seq_len,
        },
        "models": list(models),
        "absent": absent,
        **scores,
        "speed": {
            "new_tokens": cfg.speed_tokens,
            "batch_size": 1,
            "decoding": "greedy, KV cache",
            "threads": torch.get_num_threads(),
            "repeats": SPEED_REPEATS,
        },
        "external": external,
        "samples": samples,
        "generation": {
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "seed": cfg.seed,
        },
        "train": config.get("train", {}),
        "model": config["model"],
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if (model_dir / "loss.png").is_file():  # the report links it; publish ships it beside report.md
        shutil.copy2(model_dir / "loss.png", ctx.out / "loss.png")
    md = _markdown(report, _loss_curve(model_dir / "loss.jsonl"), has_plot=(ctx.out / "loss.png").is_file())
    (ctx.out / "report.md").write_text(md)
    ctx.report.markdown("eval-report", md, description="Evaluation report")

    metrics: dict[str, Any] = {}
    for name, s in scores.items():
        key = name.replace("-", "_")
        metrics.update(
            {
                f"{key}_{k}": v
                for k, v in s.items()
                if k not in ("seconds", "file") and not (name == "fp32" and k.startswith("delta"))
            }
        )
    if external:
        metrics["external_bpb"] = {e["path"]: {name: s["bpb"] for name, s in e["models"].items()} for e in external}
    metrics["val_windows"] = report["val"]["windows"]
    return metrics


def _loss_curve(path: Path, keep: int = 12) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with_val = [r for r in rows if r.get("val_loss") is not None]
    rows = with_val if len(with_val) >= 2 else rows
    step = max(1, math.ceil(len(rows) / keep))
    return rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])


def _fmt(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _markdown(report: dict[str, Any], curve: list[dict[str, Any]], has_plot: bool = False) -> str:
    m, v = report["model"], report["val"]
    lines = [
        "# Evaluation report",
        "",
        f"Model: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads ({m['n_kv_heads']} kv), "
        f"context {m['max_seq_len']}, vocab {m['vocab_size']}.",
        f"Validation: {v['windows']} fixed windows of {v['seq_len']} tokens ({v['tokens']:,} tokens), "
        "the same for every model.",
        "",
        "| model | file | MB | val loss | perplexity | bits per byte | bpb vs fp32 | loss vs fp32 | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in report["models"]:
        s = report[name]
        is_base = name == "fp32"
        relative = "" if s["delta_relative"] is None or is_base else f" ({100 * s['delta_relative']:+.2f}%)"
        lines.append(
            f"| {name} | {s['file']} | {s['file_bytes'] / 1e6:.2f} | {_fmt(s['val_loss'])} | "
            f"{_fmt(s['perplexity'], 2)} | {_fmt(s['bpb'])} | {'' if is_base else _fmt(s['delta_bpb'], sign=True)} | "
            f"{'' if is_base else _fmt(s['delta_loss'], sign=True) + relative} | {_fmt(s['tokens_per_s'], 1)} |"
        )
    for name, reason in report["absent"].items():
        lines.append(f"| {name} | not evaluated: {reason} | | | | | | | |")
    sp = report["speed"]
    lines += [
        "",
        "int8: dynamic int8 (int8 weights, activations quantized to int8 at run time); int8-wo: "
        "weight-only int8 (int8 weights, fp32 activations; bf16 in the CPU kernel used for generation). "
        "tokens/s: "
        + (
            f"{sp['new_tokens']} greedy tokens, batch 1, KV cache, torch threads: "
            f"{sp['threads']}, median of {sp['repeats']} after a warm-up; it depends on the machine and its "
            "load."
            if sp["new_tokens"]
            else "not measured (`speed_tokens: 0`)."
        ),
    ]
    if report["external"]:
        lines += [
            "",
            "## External texts",
            "",
            "| text | model | docs | tokens | bytes | loss | perplexity | bits per byte | bpb vs fp32 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in report["external"]:
            docs = f"{e['docs_scored']:,} of {e['docs']:,}"
            if not e["models"]:
                lines.append(f"| {e['path']} | (no text) | {docs} | 0 | 0 | | | | |")
            for name, s in e["models"].items():
                lines.append(
                    f"| {e['path']} | {name} | {docs} | {e['tokens']:,} | {e['bytes']:,} | "
                    f"{_fmt(s['loss'])} | {_fmt(s['perplexity'], 2)} | {_fmt(s['bpb'])} | "
                    f"{'' if name == 'fp32' else _fmt(s['delta_bpb'], sign=True)} |"
                )
    if curve:
        lines += ["", "## Training curve", ""] + (["![loss curve](loss.png)", ""] if has_plot else [])
        lines += ["| step | train loss | val loss |", "|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['loss']:.4f} | {_fmt(r.get('val_loss'))} |" for r in curve]
    g = report["generation"]
    lines += [
        "",
        "## Samples",
        "",
        f"temperature {g['temperature']}, top-k {g['top_k']}, seeds from {g['seed']}, "
        f"up to {g['max_new_tokens']} tokens.",
        "",
    ]
    for name, samples in report["samples"].items():
        for s in samples:
            text = (s["prompt"] + s["completion"]).replace("\n", "\n> ")
            lines += [f"**{name}**, prompt *{s['prompt']}*:", "", f"> {text}", ""]
    return "\n".join(lines)


# 2: every int8 variant (weight-only added), file sizes, generation speed, external texts.
STAGE = Stage(name="evaluate", version=2, run=run, inputs=("train", "quantize", "tokenize", "train_tokenizer"))
