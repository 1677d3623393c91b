"""The `train` stage, as a package: config.py (the config section), loop.py (the training loop),
precision.py (the precision probe), ddp.py (several processes under torchrun), plots.py (the loss
curve), stage.py (the stage itself). See stage.py for what it does."""

from ember.tasks.train.config import TrainConfig
from ember.tasks.train.precision import probe_precision, resolve_precision
from ember.tasks.train.stage import STAGE, run

__all__ = ["STAGE", "TrainConfig", "probe_precision", "resolve_precision", "run"]
