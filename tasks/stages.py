"""The pipeline's stages, in order: the one list that the flow loops over, and that the CLI,
`ember audit` and the model card read. Each stage names the stages it reads (`Stage.inputs`),
always earlier ones, and its section of the pipeline config has its name."""

from __future__ import annotations

from ember.tasks import dedup, download, evaluate, normalize, publish, quantize, tokenize, train, train_tokenizer
from ember.tasks import filter as quality_filter
from ember.tasks.stage import Stage

STAGES: list[Stage] = [
    download.STAGE,
    normalize.STAGE,
    quality_filter.STAGE,
    dedup.STAGE,
    train_tokenizer.STAGE,
    tokenize.STAGE,
    train.STAGE,
    quantize.STAGE,
    evaluate.STAGE,
    publish.STAGE,
]
STAGE_NAMES: list[str] = [stage.name for stage in STAGES]
