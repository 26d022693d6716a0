"""CPU speed work, in one place: what makes training on a CPU fast, chosen by the accelerator layer and the
kernels for the "cpu" device type only. Nothing here changes a value: each trick computes the same numbers
as the plain PyTorch it replaces (up to bf16 rounding order). Measured effects: BENCHMARKS.md, "Where the time
goes".

- `bf16_matmul_is_fast()`: whether to compute in bf16 at all — CPUs without native bf16 instructions (no
  AMX, AVX512-BF16 or Arm BF16) multiply bf16 matrices through a scalar fallback, far slower than fp32.
- `tune_allocator()`: glibc keeps freed memory for reuse (page faults per step gone).
- `causal_attention()`: training attention as batched matmuls (faster than the SDPA flash kernel's
  backward on CPU at moderate lengths); `kernels.attention` picks it.
- `use_row_major_weight_grads(block)`: under torch.compile, wide linear layers compute their weight gradient
  from a row-major copy of the output gradient (oneDNN's bf16 matmul runs a transposed operand at about half
  speed; the copy is fused into the kernel that produces the gradient). `zili.parallel.compile` applies it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

# Largest batch * heads * T * T for which CPU training uses `causal_attention` (its saved attention
# probabilities cost about 1 byte per element in bf16); longer sequences use PyTorch's flash kernel, and
# so does everything without gradients (evaluation, generation), where the flash forward is faster.
MATMUL_ATTENTION_MAX_SCORES = 1 << 27

# The row-major copy of grad_out costs the same whatever the layer's input size, the time it saves grows
# with it: a net loss at 384 input features, a gain from 1024 (2-core Sapphire Rapids VM).
MIN_IN_FEATURES_FOR_ROW_MAJOR_GRAD = 1024


def _matmul_seconds(dtype: torch.dtype, size: int, reps: int) -> float:
    a, b = torch.ones(size, size, dtype=dtype), torch.ones(size, size, dtype=dtype)
    a @ b  # first call: kernel selection, allocation
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return time.perf_counter() - start


@functools.cache
def bf16_matmul_is_fast(size: int = 256, reps: int = 3) -> bool:
    """Whether this CPU multiplies bf16 matrices at least as fast as fp32 (measured once per process, ~0.1 s).
    Where it does not, bf16 autocast would only lose precision and time: the accelerator layer computes in
    fp32 instead."""
    return _matmul_seconds(torch.bfloat16, size, reps) <= _matmul_seconds(torch.float32, size, reps)


def tune_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    Every training step frees and reallocates the same large activation and gradient buffers; by default
    glibc serves blocks above 32 MB with fresh mmap()s (and trims freed heap), so each step page-faults
    gigabytes of zero-filled memory back in. This raises the mmap and trim thresholds so that the process
    keeps its peak heap. Process-wide; returns False where there is no glibc `mallopt` (macOS, musl), which
    changes nothing."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def use_matmul_attention(q: torch.Tensor, keys: int | None = None) -> bool:
    """Whether `causal_attention` beats SDPA for this training call of q against `keys` keys (default: as many
    as queries) — gradients on, moderate length."""
    B, H, T, _ = q.shape
    return torch.is_grad_enabled() and B * H * T * (keys or T) <= MATMUL_ATTENTION_MAX_SCORES


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 256,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T + causal mask) v (scale defaults to 1/sqrt(d)), in q's dtype, with plain batched
    matmuls.

    q (B, H, T, d); k (B, KV, S, d); v (B, KV, S, dv) with S >= T: the queries are the last T of the S positions
    (query i sees keys 0..S-T+i). The H/KV query heads sharing a KV head are stacked into one matrix, so keys and
    values are never repeated. Queries go in blocks of `block` positions, each against the keys up to its last
    position only, which skips most of the masked upper triangle."""
    B, H, T, d = q.shape
    kv, S, dv = k.shape[1], k.shape[2], v.shape[-1]
    group, past = H // kv, S - T
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = k.reshape(B * kv, S, d), v.reshape(B * kv, S, dv)
    future = torch.full((T, S), float("-inf"), device=q.device, dtype=q.dtype).triu_(1 + past)
    outs = []
    with torch.autocast(q.device.type, enabled=False):  # all in q's dtype; softmax accumulates in fp32
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            q_block = q[:, :, t0:t1].reshape(B * kv, group * (t1 - t0), d)
            mask = future[t0:t1, :past + t1].repeat(group, 1)
            scores = torch.baddbmm(mask, q_block, k[:, :past + t1].transpose(1, 2), alpha=scale)
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), v[:, :past + t1]).view(B, H, t1 - t0, dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


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


class _RowMajorGradLinear(nn.Linear):
    """nn.Linear (same parameters, same names) whose CPU training backward uses `_LinearFunction`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = type(self.weight) in (torch.Tensor, nn.Parameter)  # not a DTensor (tensor parallelism)
        if x.device.type == "cpu" and plain and torch.is_grad_enabled():
            return _LinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_row_major_weight_grads(module: nn.Module) -> None:
    """Swap the class of `module`'s wide nn.Linear layers (as FSDP2 swaps classes: names and parameters
    unchanged). Only worth it under torch.compile, where the copy is fused."""
    for sub in module.modules():
        if type(sub) is nn.Linear and sub.in_features >= MIN_IN_FEATURES_FOR_ROW_MAJOR_GRAD:
            sub.__class__ = _RowMajorGradLinear
