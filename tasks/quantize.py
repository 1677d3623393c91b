"""Stage `quantize`: the trained fp32 model -> int8 models, one file per variant, and config.json.

- `dynamic-int8` -> `model-int8.safetensors`: int8 Linear weights with one fp32 scale per
  output channel, activations quantized at run time (fbgemm kernels; CPU only).
- `weight-only-int8` -> `model-int8-wo.safetensors`: the same int8 weights (symmetric, scales
  rounded to bf16 values), activations stay floating point; plain PyTorch, CPU or CUDA.

In both the embedding (which is also the tied output projection) and the norms stay fp32. See
model/quantize.py for the file formats. With `enabled: false` (or no variants) the
artifact holds only config.json, with `"int8": null`, and evaluate reports the fp32 model
alone. A release (publish with `include_int8`) needs the dynamic file.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.model.checkpoint import load_model, read_config
from ember.model.quantize import (
    INT8_WEIGHTS,
    WO_INT8_WEIGHTS,
    linear_weight_bytes,
    quantize_int8,
    quantize_weight_only_int8,
    save_int8,
    save_weight_only_int8,
)
from ember.tasks.stage import Stage, StageContext

Variant = Literal["dynamic-int8", "weight-only-int8"]

# variant -> (file, metrics prefix, what config.json says about it)
VARIANTS: dict[str, tuple[str, str, dict[str, str | bool]]] = {
    "dynamic-int8": (
        INT8_WEIGHTS,
        "int8",
        {
            "scheme": "dynamic-int8",
            "per_channel": True,
            "activations": "int8, quantized per batch at run time",
            "fp32_tensors": "embedding (tied output), norms",
        },
    ),
    "weight-only-int8": (
        WO_INT8_WEIGHTS,
        "int8_wo",
        {
            "scheme": "weight-only-int8",
            "per_channel": True,
            "symmetric": True,
            "activations": "float (bf16 in the CPU generation kernel)",
            "fp32_tensors": "embedding (tied output), norms",
        },
    ),
}


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: no int8 model (the artifact holds only config.json)")
    variants: list[Variant] = Field(
        ["dynamic-int8", "weight-only-int8"],
        description="int8 models to write: dynamic-int8 (model-int8.safetensors, "
        "which a release needs) and/or weight-only-int8 "
        "(model-int8-wo.safetensors)",
    )

    @field_validator("variants")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a variant is listed twice: {value}")
        return value


def run(cfg: QuantizeConfig, ctx: StageContext) -> dict[str, Any]:
    model_dir = ctx.inputs["train"]
    _, config = read_config(model_dir)
    extra = {k: v for k, v in config.items() if k != "model"}
    variants = cfg.variants if cfg.enabled else []
    if not variants:
        (ctx.out / "config.json").write_text(
            json.dumps({"model": config["model"], **extra, "int8": None, "quantized": {}}, indent=2) + "\n"
        )
        reason = "`quantize.enabled: false`" if not cfg.enabled else "`quantize.variants` is empty"
        ctx.report.markdown("quantize-summary", f"Quantization is disabled ({reason}).")
        return {"enabled": False, "variants": []}

    model = load_model(model_dir)
    fp32_linear = linear_weight_bytes(model)
    fp32_file = (model_dir / "model.safetensors").stat().st_size
    metrics: dict[str, Any] = {
        "enabled": True,
        "variants": list(variants),
        "linear_fp32_bytes": fp32_linear,
        "fp32_file_bytes": fp32_file,
    }
    rows = [
        {
            "model": "fp32",
            "file": "model.safetensors",
            "Linear bytes": fp32_linear,
            "Linear ratio": 1.0,
            "file bytes": fp32_file,
            "file ratio": 1.0,
        }
    ]
    quantized: dict[str, dict[str, str | bool]] = {}  # variant -> its file and what config.json says of it
    for variant in variants:
        file, prefix, info = VARIANTS[variant]
        started = time.monotonic()
        if variant == "dynamic-int8":
            qmodel = quantize_int8(model)
            save_int8(qmodel, ctx.out)
        else:
            qmodel = quantize_weight_only_int8(model)
            save_weight_only_int8(qmodel, ctx.out)
        linear, size = linear_weight_bytes(qmodel), (ctx.out / file).stat().st_size
        quantized[variant] = {"file": file, **info}
        metrics.update(
            {
                f"{prefix}_linear_bytes": linear,
                f"{prefix}_linear_ratio": round(linear / fp32_linear, 4),
                f"{prefix}_file_bytes": size,
                f"{prefix}_file_ratio": round(size / fp32_file, 4),
                f"{prefix}_seconds": round(time.monotonic() - started, 2),
            }
        )
        rows.append(
            {
                "model": variant,
                "file": file,
                "Linear bytes": linear,
                "Linear ratio": metrics[f"{prefix}_linear_ratio"],
                "file bytes": size,
                "file ratio": metrics[f"{prefix}_file_ratio"],
            }
        )
    if "dynamic-int8" in quantized:  # the names stage version 1 reported, which dashboards may read
        metrics.update(
            {
                "scheme": "dynamic-int8",
                "linear_int8_bytes": metrics["int8_linear_bytes"],
                "linear_ratio": metrics["int8_linear_ratio"],
                "file_ratio": metrics["int8_file_ratio"],
            }
        )

    # Written last: both save functions also write a config.json, this one describes every variant.
    (ctx.out / "config.json").write_text(
        json.dumps(
            {"model": config["model"], **extra, "int8": quantized.get("dynamic-int8"), "quantized": quantized}, indent=2
        )
        + "\n"
    )
    ctx.report.table(
        "quantize-sizes",
        rows,
        description="Sizes of the Linear weights and of the whole file per "
        "model (the embedding, also the output projection, and the norms stay fp32)",
    )
    return metrics


# 2: a list of variants (weight-only int8 added), config.json describes them under "quantized".
STAGE = Stage(name="quantize", version=2, run=run, inputs=("train",))
