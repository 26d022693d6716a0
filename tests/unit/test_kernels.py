"""Kernel choices: every fallback equals the textbook formula, and the fused vendor paths are called with
the documented layouts (checked through CPU stand-ins that implement those kernels' documented math)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from zili import accel, kernels


def textbook_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v with KV heads repeated, in fp64; mask True = may attend."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril() if mask is None else mask
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def qkv(T=24, H=4, KV=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, H, T, d, generator=g), torch.randn(2, KV, T, d, generator=g),
            torch.randn(2, KV, T, d, generator=g))


@pytest.mark.parametrize("grad", [True, False])  # CPU training takes the matmul path, no-grad SDPA
def test_attention_fallbacks_equal_textbook(grad):
    q, k, v = qkv()
    with torch.set_grad_enabled(grad):
        out = kernels.attention(q, k, v)
    torch.testing.assert_close(out.double(), textbook_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_with_explicit_mask_equals_textbook():
    q, k, v = qkv()
    q = q[:, :, -5:]  # 5 new queries at positions 19..23 against 24 keys (decoding with a KV cache)
    mask = torch.arange(24)[None, :] <= torch.arange(19, 24)[:, None]
    out = kernels.attention(q, k, v, mask, causal=False)
    torch.testing.assert_close(out.double(), textbook_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_rms_norm_and_rope_fallbacks_equal_textbook():
    x, w = torch.randn(3, 7, 32), torch.randn(32)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6).double(), ref, atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 4, 10, 16)
    angles = torch.outer(torch.arange(10.0), 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
    pairs = (torch.complex(x[..., :8].double(), x[..., 8:].double())
             * torch.polar(torch.ones_like(angles).double(), angles.double()))
    ref = torch.cat([pairs.real, pairs.imag], -1)  # rotating (i, i + d/2) pairs by position x frequency
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    torch.testing.assert_close(kernels.apply_rope(x, cos, sin).double(), ref, atol=1e-5, rtol=1e-5)


def fake_torch_npu(calls):
    """Stand-ins for torch_npu's kernels with their documented semantics (BNSD layout, sparse_mode 2 = causal
    from the compressed 2048 x 2048 upper-triangular mask, rms_norm returning (y, rstd), rotary_mul)."""

    def npu_fusion_attention(q, k, v, head_num, input_layout, atten_mask=None, scale=1.0, keep_prob=1.0, sparse_mode=0):
        calls.append("attention")
        assert input_layout == "BNSD" and head_num == q.shape[1] and sparse_mode == 2 and keep_prob == 1.0
        assert atten_mask.shape == (2048, 2048) and atten_mask[0, 1] and not atten_mask[1, 0]
        assert scale == pytest.approx(1 / math.sqrt(q.shape[-1]))
        return (textbook_attention(q, k, v).to(q.dtype), None, None)

    def npu_rms_norm(x, gamma, epsilon):
        calls.append("rms_norm")
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
        return x * rstd * gamma, rstd

    def npu_rotary_mul(x, r1, r2):
        calls.append("rope")
        assert r1.dim() == 4 and r1.shape[-2:] == x.shape[-2:]
        half = x.shape[-1] // 2
        return x * r1 + torch.cat([-x[..., half:], x[..., :half]], -1) * r2

    return types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention, npu_rms_norm=npu_rms_norm,
                                 npu_rotary_mul=npu_rotary_mul)


def test_npu_kernels_are_called_with_documented_layouts(monkeypatch):
    calls = []
    npu = fake_torch_npu(calls)
    q, k, v = qkv()
    torch.testing.assert_close(kernels.npu_attention(npu, q, k, v).double(), textbook_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    # dispatch: an "npu" tensor goes to the fused kernels when the plugin is there
    monkeypatch.setattr(accel, "vendor_ops", lambda device_type: npu if device_type == "npu" else None)
    x = torch.randn(2, 3, 8)
    monkeypatch.setattr(kernels, "_device_type", lambda t: "npu")
    kernels.rms_norm(x, torch.ones(8), 1e-6)
    kernels.apply_rope(torch.randn(1, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8))
    kernels.attention(q, k, v)
    assert calls == ["attention", "rms_norm", "rope", "attention"]


def test_flash_attention_layout(monkeypatch):
    def flash(q, k, v, causal):
        assert causal and q.shape[1] == 24  # (B, T, H, d)
        return textbook_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).float()

    q, k, v = qkv()
    torch.testing.assert_close(kernels.flash_attention(flash, q, k, v).double(), textbook_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_npu_causal_mask_is_built_once_per_device(monkeypatch):
    npu = fake_torch_npu([])
    masks = []
    fused = npu.npu_fusion_attention

    def recording(*args, atten_mask=None, **kwargs):
        masks.append(atten_mask)
        return fused(*args, atten_mask=atten_mask, **kwargs)

    npu.npu_fusion_attention = recording
    monkeypatch.setattr(kernels, "_npu_causal_masks", {})
    kernels.npu_attention(npu, *qkv())
    kernels.npu_attention(npu, *qkv(T=40, seed=1))  # another length: the same compressed mask
    monkeypatch.setattr(kernels, "_device_type", lambda t: "npu")
    monkeypatch.setattr(accel, "vendor_ops", lambda device_type: npu if device_type == "npu" else None)
    kernels.attention(*qkv(seed=2))
    assert len(masks) == 3 and masks[1] is masks[0] and masks[2] is masks[0]
    other = kernels.npu_causal_mask(torch.device("meta"))  # another device has its own
    assert other is not masks[0] and other.device.type == "meta" and other.shape == masks[0].shape


def test_compiled_npu_attention_compiles_once_and_reads_the_cached_mask(monkeypatch):
    def npu_fusion_attention(q, k, v, head_num, input_layout, atten_mask=None, scale=1.0, keep_prob=1.0,
                             sparse_mode=0):  # the documented math, traceable (no data-dependent checks)
        rep = q.shape[1] // k.shape[1]
        scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
        causal = atten_mask[: q.shape[2], : k.shape[2]]
        return torch.softmax(scores.masked_fill(causal, float("-inf")), -1) @ v.repeat_interleave(rep, 1), None

    npu = types.SimpleNamespace(npu_fusion_attention=npu_fusion_attention)
    monkeypatch.setattr(kernels, "_npu_causal_masks", {})
    monkeypatch.setattr(kernels, "_device_type", lambda t: "npu")
    monkeypatch.setattr(accel, "vendor_ops", lambda device_type: npu if device_type == "npu" else None)
    graphs = []

    def count(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compiler.reset()
    try:
        compiled = torch.compile(kernels.attention, backend=count)
        outs = [compiled(*qkv(seed=seed)) for seed in range(3)]
    finally:
        torch.compiler.reset()
    assert len(graphs) == 1  # the mask cache filling up does not recompile
    assert len(kernels._npu_causal_masks) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes}
    assert not any("ones" in op or "triu" in op for op in ops)  # the mask is read, not rebuilt, in the graph
    for seed, out in enumerate(outs):
        torch.testing.assert_close(out.double(), textbook_attention(*qkv(seed=seed)), atol=1e-5, rtol=1e-5)
