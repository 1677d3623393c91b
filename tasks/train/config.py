"""The `train` section of a pipeline config: the model's shape and how to train it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.model.transformer import PRESETS, ModelConfig
from ember.storage.releases import VERSION_RE


class ModelSection(BaseModel):
    """A preset by name, with any field overridden; vocab_size comes from the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("cpu", description=f"one of {', '.join(PRESETS)}")
    dim: int | None = Field(None, gt=0, description="model width (default: the preset's)")
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="k/v heads for grouped-query attention")
    hidden_dim: int | None = Field(None, gt=0, description="SwiGLU width")
    max_seq_len: int | None = Field(None, gt=0, description="context length")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSection:
        self.build(vocab_size=256)  # raises on e.g. dim not divisible by n_heads, before any work
        return self

    def build(self, vocab_size: int) -> ModelConfig:
        overrides = self.model_dump(exclude={"preset"}, exclude_none=True)
        return ModelConfig(vocab_size=vocab_size, **{**PRESETS[self.preset], **overrides})


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSection = ModelSection()
    seed: int = Field(1337, ge=0, description="initial weights and the data order")
    batch_size: int = Field(16, gt=0, description="windows per micro-batch (per process)")
    seq_len: int | None = Field(None, gt=0, description="tokens per window; None = the model's max_seq_len")
    tokens_per_step: int | None = Field(
        None,
        gt=0,
        description="tokens per optimizer step (the global batch): micro-batches of batch_size windows "
        "are accumulated until they reach it, rounded up to whole micro-batches; None = one micro-batch",
    )
    max_steps: int = Field(1000, gt=0, description="optimizer steps; the cosine schedule ends here")
    max_minutes: float | None = Field(
        None, gt=0, description="stop earlier at this time budget (counted across resumes)"
    )
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(2e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay, on matrices only")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 = no clipping")
    eval_every: int = Field(100, gt=0, description="steps between validation passes (and one at the end)")
    eval_batches: int = Field(10, gt=0, description="validation batches of batch_size fixed windows")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints in the work folder")
    log_every: int = Field(10, gt=0, description="steps between loss.jsonl records")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda, then mps, then cpu")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 = bf16 autocast; auto = bf16 on CUDA, elsewhere whichever a short probe of the "
        "model's matmuls at start finds faster (logged)",
    )
    compile: bool = Field(False, description="run the model through torch.compile (a C compiler is needed on CPU)")
    nproc: int = Field(
        1,
        ge=1,
        description="processes on this machine; >1 launches torchrun (DistributedDataParallel, "
        "gloo on CPU, nccl on CUDA) with the same global batch",
    )
    warm_start: bool | str = Field(
        False,
        description="start from a release's weights when its tokenizer and model shape are this run's, else "
        "from scratch: a version (v0003), or true = the newest published release not already trained on this "
        "run's tokens (what the scheduled retrain uses)",
    )

    @field_validator("warm_start")
    @classmethod
    def _release_name(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not VERSION_RE.match(value):
            raise ValueError(f"{value!r} is not a release version such as v0003 (or true / false)")
        return value

    @model_validator(mode="after")
    def _lr_range(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        context = self.model.build(vocab_size=256).max_seq_len
        if self.seq_len is not None and self.seq_len > context:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {context}")
        if self.windows_per_step(self.seq_len or context) < self.nproc:
            raise ValueError(
                f"a step of {self.windows_per_step(self.seq_len or context)} windows cannot be shared "
                f"by nproc = {self.nproc} processes; raise tokens_per_step or batch_size"
            )
        return self

    def windows_per_step(self, seq_len: int) -> int:
        """The global batch in windows: whole micro-batches, at least one."""
        if self.tokens_per_step is None:
            return self.batch_size
        return math.ceil(self.tokens_per_step / (self.batch_size * seq_len)) * self.batch_size
