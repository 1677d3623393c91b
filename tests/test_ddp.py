"""DistributedDataParallel: 2 processes (torchrun, gloo, CPU) train like 1 with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ember.tasks import train
from ember.tasks.stage import Reporter
from test_train_stages import context, make_artifacts, tiny_train, write_tokens

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


class RecordingReporter(Reporter):
    def __init__(self):
        super().__init__("train")
        self.calls: list[tuple] = []

    def progress(self, done, total, what=""):
        self.calls.append(("progress", done, total))

    def table(self, key, rows, description=""):
        self.calls.append(("table", key, rows))

    def markdown(self, key, text, description=""):
        self.calls.append(("markdown", key, text))


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "loss.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    artifacts = make_artifacts(tmp_path / "artifacts", chars=60_000)
    # 15 windows a step: one process runs micro-batches of 5, 5 and 5; two processes split the
    # step 7 / 8 (micro-batches 5 + 2 and 5 + 3), so uneven shares and no_sync are both exercised.
    cfg = tiny_train(
        batch_size=5,
        tokens_per_step=15 * 64,
        max_steps=4,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        checkpoint_every=2,
    )
    one = context(tmp_path, "one", artifacts)
    single = train.run(cfg, one)
    reporter = RecordingReporter()
    two = context(tmp_path, "two", artifacts, reporter=reporter)
    multi = train.run(cfg.model_copy(update={"nproc": 2}), two)

    assert single["processes"] == 1 and multi["processes"] == 2
    a, b = records(one.out), records(two.out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert (rb.get("val_loss") is None) == (ra.get("val_loss") is None)
        if ra.get("val_loss") is not None:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    wa, wb = load_file(one.out / "model.safetensors"), load_file(two.out / "model.safetensors")
    # Adam divides by the gradients' running RMS, so float-rounding differences in near-zero
    # gradients show in the weights (about 1e-6 here), still far below one step's update (lr 3e-3).
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)

    # Rank 0 alone wrote the artifact and the checkpoints; its reports reached the stage's reporter.
    assert sorted(p.name for p in two.out.iterdir()) == sorted(p.name for p in one.out.iterdir())
    assert sorted(p.name for p in two.work.iterdir()) == ["LATEST", "ckpt-00000004"]
    kinds = [call[0] for call in reporter.calls]
    assert kinds.count("progress") == 4 and ("progress", 4, 4) in reporter.calls
    assert ("table", "train-loss") in [call[:2] for call in reporter.calls]
    summary = next(call[2] for call in reporter.calls if call[0] == "markdown")
    assert "x 2 processes" in summary and "4 steps" in summary


def test_failed_workers_fail_the_stage_with_their_message(tmp_path):
    tokens_dir = tmp_path / "tokenize"
    write_tokens(tokens_dir / "train", [[5, 6, 7]])
    write_tokens(tokens_dir / "val", [])
    (tokens_dir / "meta.json").write_text(json.dumps({"vocab_size": 512, "dtype": "uint16"}))
    ctx = context(tmp_path, "train", {"tokenize": tokens_dir})
    # Every rank raises before training; the stage's error says why, not only that torchrun failed.
    with pytest.raises(
        RuntimeError,
        match=r"distributed training \(2 processes\) failed with exit code 1\n"
        r"rank \d: ValueError: .*tokenize/train: 4 train tokens",
    ):
        train.run(tiny_train(max_steps=2, nproc=2), ctx)
    assert list(ctx.out.iterdir()) == []
