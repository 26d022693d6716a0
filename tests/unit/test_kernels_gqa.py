"""Grouped-query attention without repeated keys and values: the SDPA fallback hands SDPA the KV heads as they
are (`enable_gqa`) wherever a fused kernel takes them so, and the CPU matmul path stacks the query heads of a
group instead — neither makes (nor keeps for backward) a copy of K and V at query-head width. Both compute
what repeating the KV heads computes, and so does the fallback where it still repeats them (a torch whose
fused kernels need equal head counts: then enable_gqa would mean the math kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zili import cpu, kernels

B, H, KV, D = 2, 4, 2, 16


class ShapesMade(TorchDispatchMode):
    """Records the shape of every tensor that an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.fixture
def no_repeat(monkeypatch):
    """Calling repeat_interleave (what the fallback did to K and V) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("KV heads repeated with repeat_interleave")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)


def inputs(T, S, seed=0):
    """q (B, H, T, D), k and v (B, KV, S, D) in fp64, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, n, D, generator=g, dtype=torch.float64, requires_grad=True)
            for heads, n in ((H, T), (KV, S), (KV, S))]


def decode_mask(T, S):
    """T new queries at positions S-T..S-1 against S keys, as in generation with a KV cache."""
    return torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]


def repeated_reference(q, k, v, mask=None):
    """The old fallback's math: each KV head copied for its H/KV query heads (as repeat_interleave on dim 1
    does, written without it), then plain SDPA."""

    def widen(t):
        return t[:, :, None].expand(B, KV, H // KV, *t.shape[2:]).reshape(B, H, *t.shape[2:])

    return F.scaled_dot_product_attention(q, widen(k), widen(v), attn_mask=mask, is_causal=mask is None)


def values_and_grads(fn, tensors):
    """fn's output and the gradients of a fixed random projection of it with respect to `tensors`."""
    out = fn(*tensors)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, tensors, grad_out))


def assert_all_close(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_fallback_passes_grouped_kv_unrepeated_where_a_fused_kernel_takes_it(masked, no_repeat, monkeypatch):
    monkeypatch.setattr(kernels, "fused_sdpa_takes_gqa", lambda device, dtype, masked: True)
    mask = decode_mask(24, 24) if masked else None
    tensors = inputs(24, 24)
    assert_all_close(values_and_grads(lambda q, k, v: kernels.sdpa_attention(q, k, v, mask), tensors),
                     values_and_grads(lambda q, k, v: repeated_reference(q, k, v, mask), tensors))


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_fallback_repeats_kv_where_no_fused_kernel_takes_it(masked, monkeypatch):
    monkeypatch.setattr(kernels, "fused_sdpa_takes_gqa", lambda device, dtype, masked: False)
    mask = decode_mask(24, 24) if masked else None
    tensors = inputs(24, 24)
    assert_all_close(values_and_grads(lambda q, k, v: kernels.sdpa_attention(q, k, v, mask), tensors),
                     values_and_grads(lambda q, k, v: repeated_reference(q, k, v, mask), tensors))


@pytest.mark.parametrize("masked", [False, True])
def test_no_copy_of_kv_at_query_head_width_on_this_torch(masked):
    if not kernels.fused_sdpa_takes_gqa(torch.device("cpu"), torch.float64, masked):
        pytest.skip("this torch's CPU SDPA kernels need as many KV heads as query heads (as torch 2.6's did)")
    # 5 queries against 24 keys: a copy of K or V at query-head width has a shape nothing else has, (B, H, 24, D)
    mask = decode_mask(5, 24) if masked else None
    tensors = inputs(5, 24)
    with ShapesMade() as made:
        got = values_and_grads(lambda q, k, v: kernels.sdpa_attention(q, k, v, mask), tensors)
    assert (B, H, 24, D) not in made.shapes and (B, KV, H // KV, 24, D) not in made.shapes
    assert_all_close(got, values_and_grads(lambda q, k, v: repeated_reference(q, k, v, mask), tensors))


def test_cpu_matmul_attention_groups_queries_instead_of_repeating_kv(no_repeat):
    tensors = inputs(20, 20)
    assert_all_close(values_and_grads(lambda q, k, v: cpu.causal_attention(q, k, v, block=8), tensors),
                     values_and_grads(repeated_reference, tensors))


def test_attention_without_gradients_takes_the_sdpa_fallback(no_repeat, monkeypatch):
    monkeypatch.setattr(kernels, "fused_sdpa_takes_gqa", lambda device, dtype, masked: True)
    q, k, v = inputs(24, 24)
    with torch.no_grad():
        torch.testing.assert_close(kernels.attention(q, k, v), repeated_reference(q, k, v))
