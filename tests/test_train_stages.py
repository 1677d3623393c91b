"""The train, quantize and evaluate stages on a real (small) token artifact built here."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ember.model.checkpoint import load_model
from ember.model.tokenizer import SPECIAL_TOKENS, load_tokenizer
from ember.model.transformer import Transformer, configure_optimizer
from ember.tasks import evaluate, quantize, train
from ember.tasks.stage import Reporter, StageContext
from helpers import CORPORA, stage_context

SHAKESPEARE = CORPORA / "tinyshakespeare" / "input.txt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# -- a tokenizer and token artifact in the contract's formats -----------------------------------


def write_tokens(folder: Path, docs: list[list[int]]) -> None:
    folder.mkdir(parents=True)
    stream = np.array([t for doc in docs for t in doc + [2]], dtype=np.uint16)
    table = pa.table({"tokens": pa.array(stream, type=pa.uint16())})
    with pa.OSFile(str(folder / "part-00000.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def make_artifacts(root: Path, chars: int = 150_000, val_fraction: float = 0.1) -> dict[str, Path]:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:chars]
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=list(SPECIAL_TOKENS),  # the ids load_tokenizer checks
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok_dir = root / "train_tokenizer"
    tok_dir.mkdir(parents=True)
    tokenizer.save(str(tok_dir / "tokenizer.json"))

    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        digest = int(hashlib.sha256(f"shakespeare:{i}".encode()).hexdigest()[:8], 16)
        splits["val" if digest / 2**32 < val_fraction else "train"].append(doc)
    tokens_dir = root / "tokenize"
    meta = {"vocab_size": tokenizer.get_vocab_size(), "dtype": "uint16", "eos_id": 2, "bos_id": 1, "pad_id": 0}
    for split, texts in splits.items():
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
        write_tokens(tokens_dir / split, ids)
        meta.update(
            {
                f"{split}_tokens": sum(len(x) + 1 for x in ids),
                f"{split}_bytes": sum(len(t.encode()) for t in texts),
                f"{split}_docs": len(texts),
            }
        )
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    return {"tokenize": tokens_dir, "train_tokenizer": tok_dir}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


def context(
    tmp: Path, name: str, inputs: dict[str, Path], work: Path | None = None, reporter: Reporter | None = None
) -> StageContext:
    return stage_context(
        tmp, f"{name}-out", inputs, work=work or tmp / f"{name}-work", reporter=reporter or Reporter(name)
    )


def tiny_train(**overrides) -> train.TrainConfig:
    """40 steps of 8 windows, accumulated from 2 micro-batches of 4. fp32 set, not probed: runs
    compared with each other must not depend on a timing."""
    values = dict(
        model={"preset": "tiny"},
        batch_size=4,
        tokens_per_step=8 * 64,
        max_steps=40,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_every=20,
        eval_batches=4,
        checkpoint_every=10,
        log_every=5,
        device="cpu",
        precision="fp32",
    )
    return train.TrainConfig(**{**values, **overrides})


class Crash(RuntimeError):
    pass


class CrashingReporter(Reporter):
    """Dies when training reports step `at`, as a killed process would (its checkpoint is on disk)."""

    def __init__(self, at: int):
        super().__init__("train")
        self.at = at
        self.tables: list[tuple[str, object, str]] = []

    def table(self, key, rows, description=""):
        self.tables.append((key, rows, description))
        super().table(key, rows, description)

    def progress(self, done, total, what=""):
        if done >= self.at:
            raise Crash(f"crash at step {done}")


# -- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(artifacts, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("trained")
    ctx = context(tmp, "train", artifacts)
    metrics = train.run(tiny_train(), ctx)
    return ctx.out, metrics


def test_training_lowers_the_loss_and_writes_the_contract_files(trained):
    out, metrics = trained
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[-1]["step"] == 40
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["val_loss"] < records[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["dim"] == 64 and config["model"]["vocab_size"] == 512
    assert config["tokenizer"] == {"bos_id": 1, "eos_id": 2, "pad_id": 0}
    assert config["train"]["steps"] == 40 and config["train"]["val_loss"] == metrics["val_loss"]
    assert metrics["resumed_from"] is None and metrics["tokens"] == 40 * 8 * 64
    assert metrics["tokens_per_step"] == 8 * 64 and metrics["precision"] == "fp32"
    assert 0 < metrics["val_bpb"] < 8
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resumed_run_equals_uninterrupted_run(artifacts, trained, tmp_path):
    reference, _ = trained
    cfg = tiny_train(eval_every=7, log_every=3)  # other unkeyed intervals: same weights expected
    work = tmp_path / "work"
    crashing = CrashingReporter(at=25)
    with pytest.raises(Crash):
        train.run(cfg, context(tmp_path, "first", artifacts, work=work, reporter=crashing))
    assert (work / "LATEST").read_text().strip() == "ckpt-00000020"
    # Each checkpoint left the curve so far beside its weights; the report waits for the end.
    assert crashing.tables == []
    assert (work / "ckpt-00000020" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(work.rglob("*.partial.png"))
    state = torch.load(work / "ckpt-00000020" / "state.pt", weights_only=True)
    assert state["step"] == 20 and state["config"] == cfg.model_dump(mode="json")
    assert state["extra"]["precision"] == "fp32" and state["optimizer"]["state"]
    ctx = context(tmp_path, "second", artifacts, work=work)
    metrics = train.run(cfg, ctx)
    assert metrics["resumed_from"] == 20
    # The report: the summary with its curve first, then the loss table (records at steps 1, 3,
    # 6, 7, 9, ...: every 3rd step and the evaluations at 7, 14, ...).
    summary, table = ctx.report.report()
    assert summary["key"] == "train-summary" and "resumed from step 20" in summary["markdown"]
    assert "![loss curve](loss.png)" in summary["markdown"] and (ctx.out / "loss.png").is_file()
    assert table["key"] == "train-loss" and table["markdown"].startswith("| step |")
    rows = [line.split("|")[1:-1] for line in table["markdown"].splitlines()[2:]]
    assert [cell.strip() for cell in rows[3]][0] == "7" and rows[3][2].strip() and not rows[2][2].strip()

    expected, got = load_file(reference / "model.safetensors"), load_file(ctx.out / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    a, b = losses(reference), losses(ctx.out)
    assert {3, 6, 18} <= b.keys()  # the records logged before the crash survive in the checkpoint
    common = a.keys() & b.keys()
    assert {1, 15, 30, 35, 40} <= common and all(a[s] == b[s] for s in common)


def losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (folder / "loss.jsonl").read_text().splitlines())}


def test_quantize_and_evaluate_report_both_models(artifacts, trained, tmp_path):
    model_dir, _ = trained
    qctx = context(tmp_path, "quantize", {"train": model_dir})
    qmetrics = quantize.run(quantize.QuantizeConfig(), qctx)
    assert (qctx.out / "model-int8.safetensors").exists()
    assert qmetrics["linear_ratio"] <= 0.3 and qmetrics["int8_file_bytes"] < qmetrics["fp32_file_bytes"]

    ectx = context(tmp_path, "evaluate", {"train": model_dir, "quantize": qctx.out, **artifacts})
    cfg = evaluate.EvaluateConfig(eval_batches=2, batch_size=8, max_new_tokens=20)
    metrics = evaluate.run(cfg, ectx)
    report = json.loads((ectx.out / "report.json").read_text())
    fp32, int8 = report["fp32"]["bpb"], report["int8"]["bpb"]
    assert 0 < fp32 < 8 and abs(int8 - fp32) / fp32 < 0.03
    assert metrics["fp32_bpb"] == fp32 and report["val"]["windows"] == 16
    assert [s["prompt"] for s in report["samples"]["fp32"]] == cfg.prompts
    assert all(s["tokens"] > 0 for s in report["samples"]["int8"])
    md = (ectx.out / "report.md").read_text()
    assert "| int8 |" in md and "Once upon a time" in md
    # Seeded: the same config gives the same samples.
    again = context(tmp_path, "evaluate-again", {"train": model_dir, "quantize": qctx.out, **artifacts})
    evaluate.run(cfg, again)

    def texts(report: dict) -> dict:
        return {name: [s["completion"] for s in samples] for name, samples in report["samples"].items()}

    assert texts(json.loads((again.out / "report.json").read_text())) == texts(report)


def test_too_short_train_stream_names_the_artifact(tmp_path):
    tokens_dir = tmp_path / "tokenize"
    write_tokens(tokens_dir / "train", [[5, 6, 7]])
    write_tokens(tokens_dir / "val", [])
    (tokens_dir / "meta.json").write_text(json.dumps({"vocab_size": 512, "dtype": "uint16", "val_tokens": 0}))
    with pytest.raises(ValueError, match=r"tokenize/train: 4 train tokens"):
        train.run(tiny_train(), context(tmp_path, "train", {"tokenize": tokens_dir, "train_tokenizer": tmp_path}))


def test_empty_val_split_skips_validation(tmp_path):
    artifacts = make_artifacts(tmp_path, chars=30_000, val_fraction=0.0)
    metrics = train.run(tiny_train(max_steps=3), context(tmp_path, "train", artifacts))
    assert metrics["steps"] == 3 and metrics["val_loss"] is None and metrics["val_bpb"] is None


@pytest.mark.parametrize(
    "section, message",
    [
        ({"model": {"preset": "huge"}}, "unknown preset"),
        ({"model": {"preset": "tiny", "n_heads": 3}}, "not a multiple"),
        ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr"),
        ({"batch_size": 0}, "greater than 0"),
        ({"model": {"preset": "tiny"}, "seq_len": 65}, "exceeds the model's max_seq_len 64"),
        ({"epochs": 3}, "Extra inputs"),
        ({"grad_accum": 2}, "Extra inputs"),
        ({"batch_size": 1, "nproc": 2}, "a step of 1 windows cannot be shared by nproc = 2 processes"),
        ({"precision": "fp16"}, "Input should be 'auto', 'fp32' or 'bf16'"),
    ],
    ids=[
        "unknown_preset",
        "heads_do_not_divide",
        "min_lr_above_lr",
        "zero_batch",
        "seq_len_above_context",
        "unknown_key",
        "v1_grad_accum_is_now_tokens_per_step",
        "step_smaller_than_nproc",
        "unknown_precision",
    ],
)
def test_bad_train_config_is_refused(section, message):
    with pytest.raises(ValidationError, match=message):
        train.TrainConfig(**section)


def test_unkeyed_fields_are_intervals_and_how_the_batch_is_computed():
    assert set(train.STAGE.unkeyed) == {"log_every", "eval_every", "checkpoint_every", "nproc", "compile"}
    params = train.STAGE.params(train.TrainConfig())
    assert "lr" in params and "model" in params and "log_every" not in params
    assert {"precision", "tokens_per_step", "warm_start"} <= params.keys()


@pytest.mark.parametrize(
    "batch_size, tokens_per_step, windows",
    [
        (16, None, 16),
        (4, 8 * 64, 8),
        (4, 8 * 64 + 1, 12),
        (8, 100, 8),
    ],
    ids=["one_micro_batch", "two_micro_batches", "rounded_up_to_whole_micro_batches", "at_least_one"],
)
def test_tokens_per_step_sets_the_accumulation(batch_size, tokens_per_step, windows):
    cfg = tiny_train(batch_size=batch_size, tokens_per_step=tokens_per_step)
    assert cfg.windows_per_step(64) == windows


def test_time_budget_stops_training_and_is_logged(artifacts, tmp_path, caplog):
    ctx = context(tmp_path, "train", artifacts)
    with caplog.at_level("INFO", logger="ember.train"):
        metrics = train.run(tiny_train(max_steps=10_000, max_minutes=0.02), ctx)
    assert 0 < metrics["steps"] < 10_000 and metrics["seconds"] >= 1.2
    assert f"time budget of 0.02 min reached at step {metrics['steps']}" in caplog.text
    assert json.loads((ctx.out / "config.json").read_text())["train"]["steps"] == metrics["steps"]


@pytest.mark.parametrize(
    "fp32_s, bf16_s, expected",
    [
        ([0.010], [0.300], "fp32"),
        ([0.010, 0.010], [0.009, 0.009], "fp32"),
        ([0.010, 0.010], [0.005, 0.012], "fp32"),
        ([0.010, 0.011], [0.005, 0.006], "bf16"),
    ],
    ids=["bf16_much_slower", "bf16_barely_faster", "rounds_disagree", "bf16_clearly_faster_in_every_round"],
)
def test_auto_precision_follows_the_probe(monkeypatch, fp32_s, bf16_s, expected):
    model = Transformer(train.TrainConfig(model={"preset": "tiny"}).model.build(vocab_size=512))
    monkeypatch.setattr("ember.tasks.train.precision.probe_precision", lambda *args: {"fp32": fp32_s, "bf16": bf16_s})
    precision, why = train.resolve_precision("auto", model, 4, 64, torch.device("cpu"))
    assert precision == expected and f"{fp32_s[0] * 1e3:.1f}" in why and "ms in fp32" in why
    assert train.resolve_precision("bf16", model, 4, 64, torch.device("cpu")) == ("bf16", "set in the config")


def test_precision_probe_times_both_and_leaves_no_trace():
    model = Transformer(train.TrainConfig(model={"preset": "tiny"}).model.build(vocab_size=512))
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = train.probe_precision(model, 4, 64, torch.device("cpu"))
    assert times.keys() == {"fp32", "bf16"} and len(times["fp32"]) == len(times["bf16"]) in (1, 2)
    assert all(t > 0 for ts in times.values() for t in ts)
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compile_failure_says_how_to_turn_it_off(artifacts, tmp_path, monkeypatch):
    def broken_compile(model, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(no compiler)")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    ctx = context(tmp_path, "train", artifacts)
    with pytest.raises(
        RuntimeError,
        match=r"train.compile: torch.compile failed on cpu \(RuntimeError: "
        r"InductorError.*set train.compile: false",
    ):
        train.run(tiny_train(compile=True, max_steps=3), ctx)
    assert list(ctx.out.iterdir()) == []


def test_optimizer_decays_matrices_only_and_is_fused_on_cpu():
    model = Transformer(train.TrainConfig(model={"preset": "tiny"}).model.build(vocab_size=512))
    optimizer = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"]) and plain["params"]
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert optimizer.defaults["fused"] is True


# -- int8 variants and external texts -------------------------------------------------------------


def external_bpb_by_hand(model, tokenizer, texts: list[str]) -> float:
    """Bits per byte of whole documents, scored window by window without padding."""
    stream = [2]
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False).ids + [2]
    seq_len, nats = model.config.max_seq_len, 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            chunk = torch.tensor([stream[start : start + seq_len + 1]])
            logits, _ = model(chunk[:, :-1], chunk[:, 1:])
            nats += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    return nats / math.log(2) / sum(len(t.encode()) for t in texts)


def test_evaluate_reports_every_variant_and_external_texts(artifacts, trained, tmp_path):
    model_dir, _ = trained
    qctx = context(tmp_path, "quantize", {"train": model_dir})
    qmetrics = quantize.run(quantize.QuantizeConfig(), qctx)
    assert {p.name for p in qctx.out.iterdir()} == {
        "model-int8.safetensors",
        "model-int8-wo.safetensors",
        "config.json",
    }
    assert qmetrics["variants"] == ["dynamic-int8", "weight-only-int8"]
    assert qmetrics["int8_wo_linear_ratio"] <= 0.3 and qmetrics["int8_wo_file_bytes"] < qmetrics["fp32_file_bytes"]
    config = json.loads((qctx.out / "config.json").read_text())
    assert set(config["quantized"]) == {"dynamic-int8", "weight-only-int8"}
    assert config["int8"]["scheme"] == "dynamic-int8" and config["model"]["dim"] == 64

    text = SHAKESPEARE.read_text(encoding="utf-8")[200_000:230_000]  # beyond what the model trained on
    docs = [d.strip() for d in text[:3_000].split("\n\n") if d.strip()]
    jsonl, txt = tmp_path / "held-out.jsonl", tmp_path / "long.txt"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    txt.write_text(text)
    cfg = evaluate.EvaluateConfig(
        eval_batches=2,
        batch_size=8,
        max_new_tokens=8,
        speed_tokens=16,
        external=[str(jsonl), str(txt)],
        external_max_tokens=3_000,
    )
    ectx = context(tmp_path, "evaluate", {"train": model_dir, "quantize": qctx.out, **artifacts})
    metrics = evaluate.run(cfg, ectx)
    report = json.loads((ectx.out / "report.json").read_text())

    assert report["models"] == ["fp32", "int8", "int8-wo"] and report["absent"] == {}
    for name, file in [
        ("fp32", model_dir / "model.safetensors"),
        ("int8", qctx.out / "model-int8.safetensors"),
        ("int8-wo", qctx.out / "model-int8-wo.safetensors"),
    ]:
        assert report[name]["file_bytes"] == file.stat().st_size and report[name]["tokens_per_s"] > 0
    fp32, wo = report["fp32"], report["int8-wo"]
    assert abs(wo["bpb"] - fp32["bpb"]) / fp32["bpb"] < 0.01 and wo["delta_bpb"] == wo["bpb"] - fp32["bpb"]
    assert metrics["int8_wo_bpb"] == wo["bpb"] and metrics["int8_wo_tokens_per_s"] == wo["tokens_per_s"]
    assert all(s["tokens"] > 0 for s in report["samples"]["int8-wo"])

    held_out, long = report["external"]
    tokenizer = load_tokenizer(artifacts["train_tokenizer"])
    assert held_out["docs_scored"] == held_out["docs"] == len(docs) and held_out["tokens"] < 3_000
    expected = external_bpb_by_hand(load_model(model_dir), tokenizer, docs)
    assert held_out["models"]["fp32"]["bpb"] == pytest.approx(expected, rel=1e-5)
    assert abs(held_out["models"]["int8-wo"]["delta_bpb"]) < 0.02 * expected
    # The long text is cut at the token budget; only the bytes it covers count.
    assert long["tokens"] == 3_000 and 0.5 * 3_000 < long["bytes"] < len(text.encode())
    assert metrics["external_bpb"][str(txt)]["int8"] == long["models"]["int8"]["bpb"]
    md = (ectx.out / "report.md").read_text()
    assert "| int8-wo |" in md and "## External texts" in md and f"| {jsonl} | int8-wo |" in md


def test_evaluate_names_the_variant_that_is_absent(artifacts, trained, tmp_path):
    model_dir, _ = trained
    qctx = context(tmp_path, "quantize", {"train": model_dir})
    qmetrics = quantize.run(quantize.QuantizeConfig(variants=["weight-only-int8"]), qctx)
    assert not (qctx.out / "model-int8.safetensors").exists() and "linear_ratio" not in qmetrics
    assert json.loads((qctx.out / "config.json").read_text())["int8"] is None
    ectx = context(tmp_path, "evaluate", {"train": model_dir, "quantize": qctx.out, **artifacts})
    evaluate.run(evaluate.EvaluateConfig(eval_batches=1, max_new_tokens=4, speed_tokens=0), ectx)
    report = json.loads((ectx.out / "report.json").read_text())
    assert report["models"] == ["fp32", "int8-wo"] and "int8" not in report
    assert "model-int8.safetensors" in report["absent"]["int8"] and report["int8-wo"]["tokens_per_s"] is None
    md = (ectx.out / "report.md").read_text()
    assert "| int8 | not evaluated: no model-int8.safetensors" in md and "not measured" in md


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"missing\.jsonl: evaluate.external file not found"),
        ('{"text": "fine"}\nnot json\n', r"bad\.jsonl: line 2: not valid JSON"),
        ('{"text": "fine"}\n\n{"body": "no text"}\n', r"bad\.jsonl: line 3: no string `text` field"),
    ],
    ids=["missing_file", "broken_json_line", "no_text_field"],
)
def test_bad_external_file_is_named(trained, artifacts, tmp_path, content, message):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    model_dir, _ = trained
    ctx = context(tmp_path, "evaluate", {"train": model_dir, "quantize": tmp_path, **artifacts})
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        evaluate.run(evaluate.EvaluateConfig(external=[str(path)]), ctx)
    assert list(ctx.out.iterdir()) == []


@pytest.mark.parametrize(
    "section, message",
    [
        ({"variants": ["dynamic-int8", "dynamic-int8"]}, "listed twice"),
        ({"variants": ["int4"]}, "Input should be"),
        ({"scheme": "dynamic-int8"}, "Extra inputs"),
    ],
    ids=["repeated_variant", "unknown_variant", "stage_v1_scheme_key"],
)
def test_bad_quantize_config_is_refused(section, message):
    with pytest.raises(ValidationError, match=message):
        quantize.QuantizeConfig(**section)
