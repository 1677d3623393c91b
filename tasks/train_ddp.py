"""One process of a DistributedDataParallel training run, started by torchrun.

The train stage launches it for `train.nproc > 1`; it can also be launched by hand, on one
machine or several (the folders must then be shared, and rank 0 writes them):

    torchrun --nproc_per_node 2 -m ember.tasks.train_ddp --config train.yaml \\
        --input tokenize=STORE/artifacts/tokenize/KEY --input train_tokenizer=STORE/artifacts/train_tokenizer/KEY \\
        --out OUT --work WORK [--store-root STORE]

`--config` holds a train section (YAML or JSON). Backend: nccl on CUDA (one GPU per local
rank), gloo on CPU. Rank 0 logs and prints its reports (progress, tables, summary, metrics),
and any rank its error, as `@ember-train {json}` lines, which the stage turns back into its
own reports and errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from ember.tasks.stage import Reporter, StageContext
from ember.tasks.train import REPORT_PREFIX, Dist, TrainConfig, pick_device, train_model


def emit(kind: str, **fields) -> None:
    # One write per line, so that the other ranks' output cannot land inside it.
    sys.stdout.write(REPORT_PREFIX + json.dumps({"kind": kind, **fields}, default=str) + "\n")
    sys.stdout.flush()


class LineReporter(Reporter):
    """Reports as `@ember-train` lines on stdout (rank 0); the stage rate-limits progress itself."""

    def progress(self, done: float, total: float, what: str = "") -> None:
        emit("progress", args=[done, total, what])

    def table(self, key: str, rows: list[dict], description: str = "") -> None:
        emit("table", args=[key, rows, description])

    def markdown(self, key: str, text: str, description: str = "") -> None:
        emit("markdown", args=[key, text, description])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ember.tasks.train_ddp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the train section, YAML or JSON")
    parser.add_argument("--input", action="append", default=[], metavar="STAGE=DIR",
                        help="an upstream artifact folder (tokenize is required; train_tokenizer for warm start)")
    parser.add_argument("--out", required=True, type=Path, help="where rank 0 writes the model")
    parser.add_argument("--work", required=True, type=Path, help="checkpoints (resumed from when present)")
    parser.add_argument("--store-root", type=Path, default=Path("."), help="for warm start: <root>/releases/latest")
    args = parser.parse_args(argv)
    inputs = {}
    for item in args.input:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--input {item!r}: expected STAGE=DIR")
        inputs[name] = Path(folder)
    if "tokenize" not in inputs:
        parser.error("--input tokenize=DIR is required")
    args.inputs = inputs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = Dist.from_env()
    try:
        cfg = TrainConfig.model_validate(yaml.safe_load(args.config.read_text()) or {})
    except FileNotFoundError:
        raise SystemExit(f"{args.config}: no such config file") from None
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, stream=sys.stdout,
                        format=f"[rank {dist.rank}] %(message)s")

    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise SystemExit("train: DistributedDataParallel runs on CUDA (nccl) or CPU (gloo), not MPS; "
                         "set train.device: cpu or train.nproc: 1")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(inputs=args.inputs, out=args.out, work=args.work,
                           report=LineReporter("train") if dist.is_main else Reporter("train"),
                           store_root=args.store_root)
        metrics = train_model(cfg, ctx, dist, device)
        if dist.is_main:
            emit("metrics", metrics=metrics)
    except Exception as err:
        # Said first, so that the stage's error names the cause rather than torchrun's summary.
        emit("error", error=f"rank {dist.rank}: {type(err).__name__}: {err}")
        raise
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
