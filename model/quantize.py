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

Weight-only int8 (`quantize_weight_only_int8`, file `model-int8-wo.safetensors`) stores each
Linear as int8 weights plus one fp32 scale per output channel (symmetric, no zero point) and
keeps the activations in floating point (fp32; bf16 inside the CPU kernel used for one token at
a time). It is plain PyTorch, so it runs on CPU and CUDA and keeps the model's device. Its
file holds `<name>.weight_int8`, `<name>.weight_scale`, `<name>.bias` if any, and the fp32
embedding and norm gains: exactly the quantized model's state dict. How each Linear computes is
explained in `Int8WeightOnlyLinear`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ember.model.checkpoint import read_config
from ember.model.transformer import Transformer

INT8_WEIGHTS = "model-int8.safetensors"
WO_INT8_WEIGHTS = "model-int8-wo.safetensors"
CONFIG = "config.json"

_M = TypeVar("_M", bound=nn.Module)


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


def quantize_int8(model: _M) -> _M:
    """A copy of `model` (on CPU, eval mode) whose nn.Linear layers are dynamic int8; `model` is untouched."""
    copy = deepcopy(model).to("cpu").eval()
    with _quiet():
        # torch declares no types for quantize_dynamic; with inplace=True it returns `copy` itself.
        quantize_dynamic(  # type: ignore[no-untyped-call]
            copy, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return copy


def int8_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The plain tensors that describe each quantized Linear (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in qmodel.named_modules():
        if not isinstance(module, DynamicLinear):
            continue
        # A quantized tensor. (torch declares no types for DynamicLinear's weight() and bias().)
        weight: torch.Tensor = module.weight()  # type: ignore[no-untyped-call]
        if weight.qscheme() == torch.per_channel_affine:
            if weight.q_per_channel_axis() != 0:
                raise ValueError(
                    f"{name}: per-channel axis {weight.q_per_channel_axis()}, expected 0 (output channels)"
                )
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
        bias: torch.Tensor | None = module.bias()  # type: ignore[no-untyped-call]
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float().contiguous()
    return tensors


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the Linear layers' weights: fp32 for a float model, int8 + scales (+ zero points,
    biases) for a quantized one, dynamic or weight-only."""
    quantized = int8_tensors(model)
    if quantized:
        return sum(t.numel() * t.element_size() for t in quantized.values())
    total = 0
    for m in model.modules():
        if isinstance(m, Int8WeightOnlyLinear):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def save_int8(qmodel: Transformer, folder: Path | str, extra: dict[str, Any] | None = None) -> Path:
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


def load_int8(folder: Path | str) -> Transformer:
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
            qlinear = DynamicLinear(  # type: ignore[no-untyped-call]  # torch declares no types for it
                module.in_features, module.out_features, bias_=module.bias is not None, dtype=torch.qint8
            )
            qlinear.set_weight_bias(_quantized_weight(name, tensors), tensors.get(f"{name}.bias"))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, qlinear)
            used.update(f"{name}.{part}" for part in ("weight_int8", "weight_scale", "weight_zero_point", "bias"))
    if unknown := set(tensors) - used:
        raise ValueError(f"{path}: unexpected tensors {sorted(unknown)}")
    return model


# -- weight-only int8 ------------------------------------------------------------------------------


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 (out, in), scale fp32 (out,)), weight ~= q * scale[:, None].

    Each scale is rounded *up* to the nearest bfloat16 value, so the CPU kernel (which takes
    bf16 scales) and the fp32 path use the very same numbers, and |weight / scale| <= 127
    still holds; the step grows by at most one bf16 ulp (2^-7, 0.8%).
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    rounded = scale.to(torch.bfloat16)
    rounded = torch.where(
        rounded.float() < scale, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded
    )
    scale = rounded.float()
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ q.T) * scale (+ bias): int8 weight q (out, in), fp32 scale per output channel.

    Two ways to compute it, chosen per call:
    - CPU, fp32 input, at most `packed_max_rows` rows (token-by-token generation, short prompts):
      `torch._weight_int8pack_mm`, which reads the int8 weights directly (a quarter of fp32's
      memory traffic). Its vectorized x86 kernels take bfloat16 activations only (fp32 runs a
      scalar loop, 5-40x slower than fp32 F.linear here), so x and y are rounded to bf16 on this
      path; accumulation is fp32. It needs in_features % 16 == 0 and 64-byte aligned operands,
      and crashes (not raises) otherwise, so those are checked first.
    - Everywhere else (CUDA, many rows as in evaluation or a long prompt):
      `F.linear(x, q.to(x.dtype)) * scale`, exact up to fp32 rounding; the int8 -> float copy
      of the weight is amortized over the rows (as fast as fp32 from about 64 rows on).
    The threshold was measured on this 2-core AVX-512 machine with the 31.5M-parameter benchmark
    shape: the packed kernel is the faster of the two up to 24 rows on 1 thread and 64 on 2
    (benchmarks/RESULTS.md). The packed kernel has no backward, so inputs that need a gradient
    take the other path.
    """

    packed_max_rows: int = 32
    # Buffers (register_buffer), declared for the type checker.
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_bf16: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device: torch.device | str | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # The packed kernel wants its scales in bf16: a derived copy, not saved.
        self.register_buffer("weight_scale_bf16", self.weight_scale.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        q, scale = quantize_per_channel(linear.weight)
        module.weight_int8.copy_(q)
        module.weight_scale.copy_(scale)
        module.weight_scale_bf16.copy_(scale.to(torch.bfloat16))
        if linear.bias is not None:
            assert module.bias is not None  # made above, as linear has one
            module.bias.copy_(linear.bias.detach())
        return module

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.weight_scale_bf16.copy_(self.weight_scale.to(torch.bfloat16))

    def _packed_ok(self, x: torch.Tensor, rows: int) -> bool:
        w = self.weight_int8
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and 0 < rows <= self.packed_max_rows
            and self.in_features % 16 == 0
            and w.is_contiguous()
            and w.data_ptr() % 64 == 0
            and not (x.requires_grad and torch.is_grad_enabled())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._packed_ok(x, rows):
            # .to(bfloat16) of an fp32 tensor is a fresh (64-byte aligned) allocation, as the kernel needs.
            a = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(a, self.weight_int8, self.weight_scale_bf16)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            # Scaling the output rather than the weight: the same product, one multiply per output.
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(module))


def quantize_weight_only_int8(model: _M) -> _M:
    """A copy of `model` (same device, eval mode) whose nn.Linear layers are `Int8WeightOnlyLinear`;
    `model` is untouched. The embedding (also the tied output projection) and norms stay fp32."""
    copy = deepcopy(model).eval()
    with torch.no_grad():
        _swap_linears(copy, Int8WeightOnlyLinear.from_linear)
    return copy


def save_weight_only_int8(qmodel: Transformer, folder: Path | str, extra: dict[str, Any] | None = None) -> Path:
    """Write `model-int8-wo.safetensors` and `config.json` into `folder`; returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not any(isinstance(m, Int8WeightOnlyLinear) for m in qmodel.modules()):
        raise ValueError(
            "save_weight_only_int8: the model has no Int8WeightOnlyLinear layers; call quantize_weight_only_int8 first"
        )
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in qmodel.state_dict().items()}
    save_file(tensors, folder / WO_INT8_WEIGHTS, metadata={"format": "ember-weight-only-int8"})
    config = {"model": asdict(qmodel.config), **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder / WO_INT8_WEIGHTS


def load_weight_only_int8(folder: Path | str, device: torch.device | str = "cpu") -> Transformer:
    """The weight-only int8 model saved by `save_weight_only_int8`, in eval mode, on `device`."""
    folder = Path(folder)
    cfg, _ = read_config(folder)
    path = folder / WO_INT8_WEIGHTS
    tensors = load_file(path)
    model = Transformer(cfg)
    _swap_linears(model, lambda m: Int8WeightOnlyLinear(m.in_features, m.out_features, bias=m.bias is not None))
    expected = set(model.state_dict())
    if missing := expected - set(tensors):
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")
    if unknown := set(tensors) - expected:
        raise ValueError(f"{path}: unexpected tensors {sorted(unknown)}")
    for name, t in model.state_dict().items():
        if tensors[name].dtype != t.dtype or tensors[name].shape != t.shape:
            raise ValueError(
                f"{path}: {name} is {tensors[name].dtype} {tuple(tensors[name].shape)}, "
                f"expected {t.dtype} {tuple(t.shape)}"
            )
    # load_state_dict copies into the module's own (aligned) buffers, as the CPU kernel needs.
    model.load_state_dict(tensors)
    return model.to(device).eval()
