"""Stage `evaluate`: validation loss, perplexity and bits per byte of the fp32 and int8 models
on the same fixed validation windows, plus seeded sample generations, as report.json and
report.md.

Bits per byte divide by the UTF-8 bytes of the validation text (tokenize's meta.json), so
models with different tokenizers compare fairly. Prompts are encoded after an EOS because in
the training stream every document follows one: the prompt then reads as a document start.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ember.model.checkpoint import load_model, read_config
from ember.model.generate import generate
from ember.model.quantize import INT8_WEIGHTS, load_int8
from ember.tasks.stage import Stage, StageContext
from ember.tasks.train import TokenStream, bits_per_byte, eval_loss, read_meta
from ember.tasks.train_tokenizer import load_tokenizer


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval_batches: int = Field(20, gt=0, description="validation batches (fixed windows, the same for both models)")
    batch_size: int = Field(8, gt=0, description="windows of max_seq_len tokens per batch")
    prompts: list[str] = Field(["Once upon a time", "The king said", "It was a dark and stormy night"],
                               description="sample generation prompts")
    max_new_tokens: int = Field(80, ge=0, description="tokens generated per prompt")
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: int | None = Field(50, gt=0, description="sample among the k likeliest tokens; None = all")
    seed: int = Field(1234, ge=0, description="sampling seed of the first prompt (+1 for each next one), "
                                            "the same for both models")


def _scores(model, windows, batch_size: int, meta: dict) -> dict:
    if windows is None:
        return {"val_loss": None, "perplexity": None, "bpb": None, "seconds": 0.0}
    started = time.monotonic()
    loss = eval_loss(model, windows, batch_size)
    return {"val_loss": loss, "perplexity": math.exp(loss), "bpb": bits_per_byte(loss, meta),
            "seconds": round(time.monotonic() - started, 2)}


def _samples(model, tokenizer, cfg: EvaluateConfig, eos_id: int) -> list[dict]:
    samples = []
    for i, prompt in enumerate(cfg.prompts):
        ids = [eos_id] + tokenizer.encode(prompt, add_special_tokens=False).ids
        started = time.monotonic()
        new = list(generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            eos_id=eos_id, seed=cfg.seed + i))
        seconds = time.monotonic() - started
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new), "tokens": len(new),
                        "tokens_per_s": round(len(new) / seconds, 1) if new and seconds > 0 else None})
    return samples


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict:
    model_dir, int8_dir = Path(ctx.inputs["train"]), Path(ctx.inputs["quantize"])
    tokens_dir = Path(ctx.inputs["tokenize"])
    meta = read_meta(tokens_dir)
    _, config = read_config(model_dir)
    eos_id = int(config.get("tokenizer", {}).get("eos_id", meta.get("eos_id", 2)))
    tokenizer = load_tokenizer(Path(ctx.inputs["train_tokenizer"]))

    models = {"fp32": load_model(model_dir)}
    if (int8_dir / INT8_WEIGHTS).exists():
        models["int8"] = load_int8(int8_dir)
    else:
        ctx.log.warning("%s: no %s (quantization disabled); evaluating fp32 only", int8_dir, INT8_WEIGHTS)
    seq_len = models["fp32"].config.max_seq_len
    val = TokenStream(tokens_dir / "val", meta.get("dtype"))
    windows = val.fixed_windows(cfg.eval_batches * cfg.batch_size, seq_len)
    if windows is None:
        ctx.log.warning("%s: no validation shard holds %d tokens; no loss figures", val.folder, seq_len + 1)

    scores = {name: _scores(model, windows, cfg.batch_size, meta) for name, model in models.items()}
    samples = {name: _samples(model, tokenizer, cfg, eos_id) for name, model in models.items()}
    delta = None
    if "int8" in scores and windows is not None:
        fp32, int8 = scores["fp32"], scores["int8"]
        delta = {"val_loss": int8["val_loss"] - fp32["val_loss"],
                 "bpb": int8["bpb"] - fp32["bpb"] if fp32["bpb"] is not None else None,
                 "relative": (int8["val_loss"] - fp32["val_loss"]) / fp32["val_loss"]}

    report = {
        "val": {"windows": 0 if windows is None else len(windows), "seq_len": seq_len,
                "tokens": 0 if windows is None else len(windows) * seq_len},
        **scores,
        "int8_delta": delta,
        "samples": samples,
        "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                       "seed": cfg.seed},
        "train": config.get("train", {}),
        "model": config["model"],
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md = _markdown(report, _loss_curve(model_dir / "loss.jsonl"))
    (ctx.out / "report.md").write_text(md)
    ctx.report.markdown("eval-report", md, description="Evaluation report")

    metrics = {f"{name}_{key}": value for name, s in scores.items() for key, value in s.items() if key != "seconds"}
    if delta is not None:
        metrics.update({"int8_delta_loss": delta["val_loss"], "int8_delta_relative": delta["relative"]})
    metrics["val_windows"] = report["val"]["windows"]
    return metrics


def _loss_curve(path: Path, keep: int = 12) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with_val = [r for r in rows if r.get("val_loss") is not None]
    rows = with_val if len(with_val) >= 2 else rows
    step = max(1, math.ceil(len(rows) / keep))
    return rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])


def _markdown(report: dict, curve: list[dict]) -> str:
    m, v = report["model"], report["val"]
    lines = [
        "# Evaluation report", "",
        f"Model: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads ({m['n_kv_heads']} kv), "
        f"context {m['max_seq_len']}, vocab {m['vocab_size']}.",
        f"Validation: {v['windows']} fixed windows of {v['seq_len']} tokens ({v['tokens']:,} tokens).", "",
        "| model | val loss | perplexity | bits per byte |", "|---|---:|---:|---:|",
    ]
    for name in ("fp32", "int8"):
        if name in report:
            s = report[name]
            lines.append(f"| {name} | {_fmt(s['val_loss'])} | {_fmt(s['perplexity'], 2)} | {_fmt(s['bpb'])} |")
    if report["int8_delta"]:
        d = report["int8_delta"]
        lines += ["", f"int8 - fp32: loss {d['val_loss']:+.4f} ({100 * d['relative']:+.2f}%), "
                      f"bits per byte {d['bpb']:+.4f}." if d['bpb'] is not None else ""]
    if curve:
        lines += ["", "## Training curve", "", "| step | train loss | val loss |", "|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['loss']:.4f} | {_fmt(r.get('val_loss'))} |" for r in curve]
    g = report["generation"]
    lines += ["", "## Samples", "",
              f"temperature {g['temperature']}, top-k {g['top_k']}, seeds from {g['seed']}, "
              f"up to {g['max_new_tokens']} tokens.", ""]
    for name, samples in report["samples"].items():
        for s in samples:
            text = (s["prompt"] + s["completion"]).replace("\n", "\n> ")
            lines += [f"**{name}**, prompt *{s['prompt']}*:", "", f"> {text}", ""]
    return "\n".join(lines)


STAGE = Stage(name="evaluate", version=1, run=run)
