"""The memory layout of a model's weights for decoding on a CPU (`use_decoding_layout`).

Inference only, and CPU only: the training model (model/transformer.py) reads its weights through
`usable_fused`, which hands back a fused matrix only while grad mode is off and the weights still
live in it. The demo and the evaluate stage load their models this way.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn

_M = TypeVar("_M", bound=nn.Module)


def usable_fused(fused: torch.Tensor | None, *linears: nn.Linear) -> torch.Tensor | None:
    """`fused` (from use_decoding_layout) when it may stand in for `linears`: no gradients wanted
    (it is not a parameter) and their weights still live in its storage (not replaced or moved)."""
    if fused is None or torch.is_grad_enabled():
        return None
    storage = fused.untyped_storage().data_ptr()
    if any(lin.weight.untyped_storage().data_ptr() != storage for lin in linears):
        return None
    return fused


def use_decoding_layout(model: _M) -> _M:
    """Lay out `model`'s float weight matrices in memory for decoding on CPU, in place.

    Shapes and values stay the same; only the memory order changes. Decoding multiplies one
    activation row by each matrix, a product bound by reading the weights, and MKL's one-row
    product reads some orders much faster than others. Measured on this project's CPU (1 thread,
    GB/s, weights out of cache; `benchmarks/RESULTS.md`):

        out x in      row-major (nn.Linear's)   column-major
        512 x 512              9.8                  11.1
        1536 x 512             9.7                  16.1
        8192 x 512            10.1 (as 2048)        20.9
        512 x 1536            13.3                  11.9

    So a matrix at least as wide as it is deep is stored column-major (`w.t().contiguous().t()`),
    the tied embedding / output projection included, and the others stay row-major. Each
    attention's wq, wk and wv become column blocks of one wider matrix (`Attention.wqkv_t`),
    and each MLP's w1 and w3 likewise (`FeedForward.w13_t`): one product instead of three or
    two, and a wider one, which MKL reads faster still. Prompts (32 rows and more) run at the
    same speed in either order; gathering embedding rows gets slower (0.8 ms for a 256-token
    prompt instead of 16 us), paid once per prompt. For inference: gradients would skip the
    fused matrices, so they are used only with grad mode off; saving writes the usual row-major
    files. GPU weights are left alone (their kernels read either order at full speed).
    Returns `model`.
    """

    def on_cpu_float(w: torch.Tensor) -> bool:
        return w.device.type == "cpu" and w.is_floating_point() and w.dim() == 2

    def fuse(modules: tuple[nn.Module, ...]) -> torch.Tensor | None:
        """One column-major (in, sum of outs) matrix whose column blocks become the weights."""
        linears = [lin for lin in modules if isinstance(lin, nn.Linear) and on_cpu_float(lin.weight)]
        if len(linears) < len(modules):  # one is not a float nn.Linear on CPU (a quantized one, say)
            return None
        fused = torch.cat([lin.weight.data for lin in linears]).t().contiguous()
        start = 0
        for lin in linears:
            width = lin.weight.size(0)
            lin.weight.data = fused[:, start : start + width].t()  # a view: (out, in), column-major
            start += width
            fused_linears.add(id(lin))
        return fused

    # Imported here: transformer.py imports this module for `usable_fused`.
    from ember.model.transformer import Attention, FeedForward

    fused_linears: set[int] = set()
    for module in model.modules():  # a block comes before its own projections
        # Ember's attention and MLP modules can use a fused matrix (their wqkv_t and w13_t).
        if isinstance(module, Attention):
            module.wqkv_t = fuse((module.wq, module.wk, module.wv))
        elif isinstance(module, FeedForward):
            module.w13_t = fuse((module.w1, module.w3))
        elif (
            isinstance(module, (nn.Linear, nn.Embedding))
            and id(module) not in fused_linears
            and on_cpu_float(module.weight)
            and module.weight.size(0) >= module.weight.size(1)
        ):
            module.weight.data = module.weight.data.t().contiguous().t()
    return model
