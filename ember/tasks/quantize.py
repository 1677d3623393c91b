"""Stage `quantize`: the trained fp32 model -> dynamic int8 (model-int8.safetensors, config.json).

Linear weights become int8 with one fp32 scale per output channel; the embedding (which is
also the tied output projection) and the norms stay fp32. See ember/model/quantize.py for the
file format. With `enabled: false` the artifact holds only config.json (with `"int8": null`)
and evaluate reports the fp32 model alone.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.model.checkpoint import load_model, read_config
from ember.model.quantize import INT8_WEIGHTS, linear_weight_bytes, quantize_int8, save_int8
from ember.tasks.stage import Stage, StageContext


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: no int8 model (the artifact holds only config.json)")
    scheme: Literal["dynamic-int8"] = Field("dynamic-int8", description="int8 Linear weights with per-channel "
                                            "scales, activations quantized at run time")


def run(cfg: QuantizeConfig, ctx: StageContext) -> dict:
    model_dir = ctx.inputs["train"]
    _, config = read_config(model_dir)
    if not cfg.enabled:
        (ctx.out / "config.json").write_text(json.dumps({**config, "int8": None}, indent=2) + "\n")
        ctx.report.markdown("quantize-summary", "Quantization is disabled (`quantize.enabled: false`).")
        return {"enabled": False}

    model = load_model(model_dir)
    fp32_bytes = linear_weight_bytes(model)
    qmodel = quantize_int8(model)
    int8_bytes = linear_weight_bytes(qmodel)
    extra = {k: v for k, v in config.items() if k != "model"}
    save_int8(qmodel, ctx.out, {**extra, "int8": {"scheme": cfg.scheme, "per_channel": True,
                                                   "fp32_tensors": "embedding (tied output), norms"}})

    fp32_file = (model_dir / "model.safetensors").stat().st_size
    int8_file = (ctx.out / INT8_WEIGHTS).stat().st_size
    metrics = {
        "enabled": True,
        "scheme": cfg.scheme,
        "linear_fp32_bytes": fp32_bytes,
        "linear_int8_bytes": int8_bytes,
        "linear_ratio": round(int8_bytes / fp32_bytes, 4),
        "fp32_file_bytes": fp32_file,
        "int8_file_bytes": int8_file,
        "file_ratio": round(int8_file / fp32_file, 4),
    }
    ctx.report.table("quantize-sizes", [
        {"what": "Linear weights", "fp32 bytes": fp32_bytes, "int8 bytes": int8_bytes,
         "ratio": metrics["linear_ratio"]},
        {"what": "whole file", "fp32 bytes": fp32_file, "int8 bytes": int8_file, "ratio": metrics["file_ratio"]},
    ], description="Sizes before and after dynamic int8 quantization (embedding and norms stay fp32)")
    return metrics


STAGE = Stage(name="quantize", version=1, run=run)
