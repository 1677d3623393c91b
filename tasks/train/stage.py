"""The `train` stage: token shards -> a trained model (model.safetensors, config.json, loss.jsonl, loss.png).

In this process (loop.py), or with `nproc: N` in N processes under torchrun (ddp.py), each
taking its slice of the same (seed, step) global batch, so that the global batch, and the loss up
to float rounding, are those of one process. The precision is measured at start (precision.py).

Warm start: with `warm_start` the flow resolves which release to start from (the newest published
one not already trained on this run's tokens, or the version named) and hands its folder over as
`ctx.resources["warm_start"]`; training starts from its weights when the release has this run's
tokenizer and model shape, else from scratch, saying why.
"""

from __future__ import annotations

from typing import Any

from ember.tasks.stage import Stage, StageContext
from ember.tasks.train.config import TrainConfig
from ember.tasks.train.ddp import launch_ddp
from ember.tasks.train.loop import Dist, train_model


def run(cfg: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    if cfg.nproc > 1 and Dist.from_env().world_size == 1:
        return launch_ddp(cfg, ctx)
    return train_model(cfg, ctx, Dist.from_env())


# Logging, evaluation and checkpoint intervals change neither the data nor the weights (the
# batches depend on the step alone, evaluation draws no random numbers), so they stay out of the
# key; nor do the number of processes and torch.compile, which change how the same global batch
# is computed (float rounding, as a different thread count does), not what is computed.
STAGE = Stage(
    name="train",
    version=2,
    run=run,
    inputs=("tokenize", "train_tokenizer"),
    unkeyed=("log_every", "eval_every", "checkpoint_every", "nproc", "compile"),
)
