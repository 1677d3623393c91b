"""Dynamic int8 quantization of the Linear layers, and its safetensors file format.

`quantize_int8` is PyTorch's eager dynamic quantization with per-output-channel weight scales:
weights are int8, activations are quantized on the fly per batch, and the matmuls run on
fbgemm/x86 int8 kernels. The embedding and the RMSNorm gains stay fp32, and so does the output
projection: with tied embeddings it is the embedding matrix used through `F.linear`, not an
`nn.Linear`, so dynamic quantization does not see it.

Quantized Linear modules keep their weights as packed params, which safetensors refuses to
store. The int8 file therefore holds plain tensors: for each quantized Linear `<name>`,
`<name>.weight_int8` (int8, out x in), `<name>.weight_scale` (fp32, one per output channel, or
a 0-dim tensor for a per-tensor scheme), `<name>.weight_zero_point` (int8, same shape), `<name>.bias`
if any; plus every fp32 parameter that is not in a Linear. Loading rebuilds the quantized
weights from exactly these integers and scales, so the loaded model computes the same logits
as the one that was saved.

`torch.ao.quantization` warns that it is deprecated in favour of torchao, but it still works
in torch 2.13 and, on this CPU, torchao's int8 paths are slower than fp32 (REFERENCE.md).
"""

from __future__ import annotations

import json
import warnings
from copy import deepcopy
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ember.model.checkpoint import read_config
from ember.model.transformer import Transformer

INT8_WEIGHTS = "model-int8.safetensors"
CONFIG = "config.json"


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation notices (a DeprecationWarning, and a UserWarning on
    quantized tensor creation); other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        yield


with _quiet():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (on CPU, eval mode) whose nn.Linear layers are dynamic int8; `model` is untouched."""
    copy = deepcopy(model).to("cpu").eval()
    with _quiet():
        return quantize_dynamic(copy, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def int8_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The plain tensors that describe each quantized Linear (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in qmodel.named_modules():
        if not isinstance(module, DynamicLinear):
            continue
        weight = module.weight()  # a quantized tensor
        if weight.qscheme() == torch.per_channel_affine:
            if weight.q_per_channel_axis() != 0:
                raise ValueError(f"{name}: per-channel axis {weight.q_per_channel_axis()}, "
                                 "expected 0 (output channels)")
            scale, zero_point = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        elif weight.qscheme() == torch.per_tensor_affine:
            scale, zero_point = torch.tensor(weight.q_scale()), torch.tensor(weight.q_zero_point())  # 0-dim
        else:
            raise ValueError(f"{name}: unsupported quantization scheme {weight.qscheme()}")
        # The observers compute scales in fp32, so storing them as fp32 loses nothing (the
        # round-trip test would catch it if it did); qint8 zero points fit in int8.
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = scale.to(torch.float32).contiguous()
        tensors[f"{name}.weight_zero_point"] = zero_point.to(torch.int8).contiguous()
        bias = module.bias()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float().contiguous()
    return tensors


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear layers' weights: fp32 for a float model, int8 + scales for a quantized one."""
    quantized = int8_tensors(model)
    if quantized:
        return sum(t.numel() * t.element_size() for t in quantized.values())
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def save_int8(qmodel: nn.Module, folder: Path | str, extra: dict | None = None) -> Path:
    """Write `model-int8.safetensors` and `config.json` into `folder`; returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = int8_tensors(qmodel)
    if not tensors:
        raise ValueError("save_int8: the model has no dynamic int8 Linear layers; call quantize_int8 first")
    # After quantization the remaining parameters are the fp32 embedding and norm gains.
    tensors.update({name: p.detach().contiguous().clone() for name, p in qmodel.named_parameters()})
    save_file(tensors, folder / INT8_WEIGHTS, metadata={"format": "ember-dynamic-int8"})
    config = {"model": asdict(qmodel.config), **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder / INT8_WEIGHTS


def _quantized_weight(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    int_repr = tensors[f"{name}.weight_int8"]
    scale = tensors[f"{name}.weight_scale"].double()
    zero_point = tensors[f"{name}.weight_zero_point"].long()
    if scale.dim() == 0:  # per-tensor
        return torch._make_per_tensor_quantized_tensor(int_repr, scale.item(), int(zero_point.item()))
    return torch._make_per_channel_quantized_tensor(int_repr, scale, zero_point, 0)


def load_int8(folder: Path | str) -> nn.Module:
    """The int8 model saved by `save_int8`, in eval mode, on CPU."""
    folder = Path(folder)
    cfg, _ = read_config(folder)
    path = folder / INT8_WEIGHTS
    tensors = load_file(path)
    model = Transformer(cfg).eval()
    # The fp32 parameters first, while every module is still a plain float one.
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {name for name, _ in model.named_parameters() if name.rpartition(".")[0] not in linears}
    fp32 = {k: v for k, v in tensors.items() if k in expected}
    if set(fp32) != expected:
        raise ValueError(f"{path}: missing fp32 tensors {sorted(expected - set(fp32))}")
    model.load_state_dict(fp32, strict=False)
    used = set(fp32)
    with _quiet():
        for name, module in linears.items():
            if f"{name}.weight_int8" not in tensors:
                raise ValueError(f"{path}: no int8 weight for Linear layer {name}")
            qlinear = DynamicLinear(module.in_features, module.out_features, bias_=module.bias is not None,
                                    dtype=torch.qint8)
            qlinear.set_weight_bias(_quantized_weight(name, tensors), tensors.get(f"{name}.bias"))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, qlinear)
            used.update(f"{name}.{part}" for part in ("weight_int8", "weight_scale", "weight_zero_point", "bias"))
    if unknown := set(tensors) - used:
        raise ValueError(f"{path}: unexpected tensors {sorted(unknown)}")
    return model
