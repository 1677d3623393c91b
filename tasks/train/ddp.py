"""Training in several processes (DistributedDataParallel under torchrun).

Two halves. `launch_ddp` is what the train stage does for `train.nproc > 1`: it starts
`python -m torch.distributed.run --standalone --nproc_per_node N -m ember.tasks.train.ddp ...`,
streams the processes' output into the stage's log and turns rank 0's reports back into the
stage's own. `main` is what each of those processes runs; it can also be launched by hand, on
one machine with folders:

    torchrun --nproc_per_node 2 -m ember.tasks.train.ddp --config train.yaml \\
        --input tokenize=STORE/artifacts/tokenize/KEY --input train_tokenizer=STORE/artifacts/train_tokenizer/KEY \\
        --out OUT --work WORK [--resource warm_start=STORE/releases/v0003]

or on several machines sharing nothing but the store: with `--store URL` the inputs are refs, and
each machine fetches them into its own cache ($EMBER_CACHE) before training; rank 0 writes OUT.

    torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr HOST0 --master_port 29500 \\
        -m ember.tasks.train.ddp --config train.yaml --store s3://bucket/ember \\
        --input tokenize=tokenize/KEY --input train_tokenizer=train_tokenizer/KEY --out OUT --work WORK

`--config` holds a train section (YAML or JSON). Backend: nccl on CUDA (one GPU per local
rank), gloo on CPU. Rank 0 logs and prints its reports (progress, tables, summary, metrics),
and any rank its error, as `@ember-train {json}` lines, which the launcher turns back into
reports and errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ember.model.device import pick_device
from ember.storage.objects import open_store
from ember.tasks.stage import Reporter, StageContext
from ember.tasks.train.config import TrainConfig
from ember.tasks.train.loop import Dist, train_model

# Lines the DDP worker of rank 0 prints for the stage to turn into ctx.report calls.
REPORT_PREFIX = "@ember-train "


def launch_ddp(cfg: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Run training in `cfg.nproc` processes under torchrun; its output goes to the log, its
    reports to ctx.report, and rank 0 writes the artifact into ctx.out."""
    config_path = ctx.work / "ddp-config.json"
    config_path.write_text(cfg.model_dump_json(indent=2) + "\n")
    # The cores this process may use, shared out: N processes of all threads each would fight.
    threads = max(1, torch.get_num_threads() // cfg.nproc)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.nproc}",
        "-m",
        "ember.tasks.train.ddp",
        "--config",
        str(config_path),
        "--out",
        str(ctx.out),
        "--work",
        str(ctx.work),
        *[f"--input={name}={path}" for name, path in sorted(ctx.inputs.items())],
        *[f"--resource={name}={path}" for name, path in sorted(ctx.resources.items())],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    ctx.log.info(
        "launching %d training processes (%d torch threads each): %s", cfg.nproc, threads, " ".join(command[:6])
    )
    metrics: dict[str, Any] | None = None
    errors: list[str] = []
    tail: deque[str] = deque(maxlen=40)
    # Same process group as this one: killing the run (SIGKILL to the group) also ends torchrun's workers.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            line = line.rstrip("\n")
            message = _report_message(line)
            if message is None:
                tail.append(line)
                ctx.log.info("%s", line)
            elif message["kind"] == "metrics":
                metrics = message["metrics"]
            elif message["kind"] == "error":
                errors.append(message["error"])
            else:
                getattr(ctx.report, message["kind"])(*message["args"])
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # this process failed or was interrupted: torchrun passes SIGTERM on
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if returncode != 0 or metrics is None:
        raise RuntimeError(
            f"distributed training ({cfg.nproc} processes) failed with exit code {returncode}"
            + "".join(f"\n{e}" for e in dict.fromkeys(errors))
            + "\nits last lines:\n"
            + "\n".join(tail)
        )
    config_path.unlink(missing_ok=True)
    return metrics


def _report_message(line: str) -> dict[str, Any] | None:
    if not line.startswith(REPORT_PREFIX):
        return None
    try:
        message = json.loads(line[len(REPORT_PREFIX) :])
    except json.JSONDecodeError:
        return None
    ok = message.get("kind") in ("progress", "table", "markdown", "metrics", "error")
    return message if ok else None


# -- one process of the run --------------------------------------------------------------------


def emit(kind: str, **fields: object) -> None:
    # One write per line, so that the other ranks' output cannot land inside it.
    sys.stdout.write(REPORT_PREFIX + json.dumps({"kind": kind, **fields}, default=str) + "\n")
    sys.stdout.flush()


class LineReporter(Reporter):
    """Reports as `@ember-train` lines on stdout (rank 0); the stage rate-limits progress itself."""

    def progress(self, done: float, total: float, what: str = "") -> None:
        emit("progress", args=[done, total, what])

    def table(self, key: str, rows: Sequence[Mapping[str, object]], description: str = "") -> None:
        emit("table", args=[key, rows, description])

    def markdown(self, key: str, text: str, description: str = "") -> None:
        emit("markdown", args=[key, text, description])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ember.tasks.train.ddp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the train section, YAML or JSON")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="STAGE=DIR",
        help="an upstream artifact folder (tokenize is required; train_tokenizer for warm start)",
    )
    parser.add_argument("--out", required=True, type=Path, help="where rank 0 writes the model")
    parser.add_argument("--work", required=True, type=Path, help="checkpoints (resumed from when present)")
    parser.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a folder from outside the store (warm_start=RELEASE_DIR: the release to start from)",
    )
    parser.add_argument(
        "--store",
        metavar="FOLDER|URL",
        help="the store the inputs are in: each --input is then STAGE=REF, fetched into this machine's cache",
    )
    args = parser.parse_args(argv)

    def folders(items: list[str], option: str) -> dict[str, Path]:
        found = {}
        for item in items:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                parser.error(f"{option} {item!r}: expected NAME=DIR")
            found[name] = Path(folder)
        return found

    args.inputs, args.resources = folders(args.input, "--input"), folders(args.resource, "--resource")
    if "tokenize" not in args.inputs:
        parser.error("--input tokenize=DIR is required")
    if args.store:
        # Each process reads the token shards many times: they come to a local cache once, checked
        # against the manifest (a second rank of the machine finds them there).
        store = open_store(args.store)
        args.inputs = {name: store.require(str(ref)).path for name, ref in args.inputs.items()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = Dist.from_env()
    try:
        cfg = TrainConfig.model_validate(yaml.safe_load(args.config.read_text()) or {})
    except FileNotFoundError:
        raise SystemExit(f"{args.config}: no such config file") from None
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        stream=sys.stdout,
        format=f"[rank {dist.rank}] %(message)s",
    )

    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise SystemExit(
            "train: DistributedDataParallel runs on CUDA (nccl) or CPU (gloo), not MPS; "
            "set train.device: cpu or train.nproc: 1"
        )
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(
            inputs=args.inputs,
            out=args.out,
            work=args.work,
            report=LineReporter("train") if dist.is_main else Reporter("train"),
            resources=args.resources,
        )
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
