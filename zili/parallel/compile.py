"""torch.compile per decoder block, applied from outside the model (`training.compile = true`).

`compile_model(model)` replaces each block's `forward` by a compiled version of itself, in place: no wrapper
module is added, so parameter names (`blocks.N.attn.q_proj.weight`, ...) stay exactly as they are for
checkpoints and Hugging Face adapters, and the blocks remain plain `nn.Module`s that FSDP can wrap.

Only training forwards are compiled (no KV cache, gradients enabled). Generation (a KV cache, one token
at a time at ever-changing positions) and `torch.no_grad()` evaluation run the same block eagerly, so
they cost no extra compilation.

On CPU the block's wider linear layers also compute their weight gradient from a row-major copy of the
output gradient: oneDNN's bf16 matmul runs `grad_out^T @ input` about half as fast when handed the
transposed view, and inside a compiled graph the copy is fused into the kernel that produces the gradient
anyway (eagerly it would cost more than it saves, so eager mode does not do it). Same values: only the
memory layout of one operand changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("zili::mm_as_laid_out", mutates_args=())
def _mm_as_laid_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b. An opaque op, so that the compiler hands `a` over in the row-major layout it was traced with
    (for `aten.mm` it would fold a `.t().contiguous()` back into a transposed view)."""
    return torch.mm(a, b)


@_mm_as_laid_out.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


class _LinearFunction(torch.autograd.Function):
    """F.linear whose backward computes grad_weight as (grad_out^T, made row-major) @ input."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if torch.is_autocast_enabled(x.device.type):  # what autocast does for F.linear, done by hand
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad = grad_out.to(x.dtype).reshape(-1, grad_out.shape[-1])
        grad_x = (grad @ weight).view(x.shape)
        grad_weight = _mm_as_laid_out(grad.t().contiguous(), x.reshape(-1, x.shape[-1]))
        grad_bias = grad.sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias  # autograd casts them to the fp32 parameters' dtype


# The row-major copy of grad_out costs the same whatever the layer's input size, the time it saves grows
# with it: measured on a 2-core Sapphire Rapids VM, a net loss at 384 input features, a gain from 1024.
MIN_IN_FEATURES_FOR_ROW_MAJOR_GRAD = 1024


class _Linear(nn.Linear):
    """nn.Linear (same parameters, same names) whose CPU training backward uses `_LinearFunction`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = type(self.weight) in (torch.Tensor, nn.Parameter)  # not a DTensor (tensor parallelism)
        if x.device.type == "cpu" and plain and torch.is_grad_enabled():
            return _LinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def compile_model(model: nn.Module, **compile_kwargs) -> None:
    """Compile every block of `model.blocks` in place (`compile_kwargs` go to `torch.compile`)."""
    for block in model.blocks.values():
        for module in block.modules():
            if type(module) is nn.Linear and module.in_features >= MIN_IN_FEATURES_FOR_ROW_MAJOR_GRAD:
                module.__class__ = _Linear  # a class swap, as FSDP2 does: one compiled graph serves all blocks
        eager = block.forward
        compiled = torch.compile(eager, **compile_kwargs)

        def forward(x, rope, cache=None, start_pos=0, _eager=eager, _compiled=compiled):
            if cache is None and torch.is_grad_enabled():
                return _compiled(x, rope)
            return _eager(x, rope, cache, start_pos)

        block.forward = forward
