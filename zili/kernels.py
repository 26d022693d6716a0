"""Kernel choices for the model's three hot spots — attention, RMSNorm, rotary embedding — by device type.

| op        | Ascend (torch_npu present)        | CUDA                                   | CPU                           | fallback (everywhere) |
|-----------|-----------------------------------|----------------------------------------|-------------------------------|-----------------------|
| attention | `npu_fusion_attention` (BNSD, causal sparse mode) | `flash_attn_func` if flash-attn is installed | `causal_attention` (batched matmuls) when training at moderate length | `scaled_dot_product_attention` |
| rms_norm  | `npu_rms_norm`                    | —                                      | —                             | `F.rms_norm` in fp32  |
| rope      | `npu_rotary_mul`                  | —                                      | —                             | `apply_rope`          |

Vendor modules come from the accelerator layer (`zili.accel.vendor_ops`, `flash_attn_func`); nothing here
imports them. Every fused path has the pure-PyTorch fallback, which the CPU tests compare with textbook
formulas; the Ascend and flash-attention paths are implemented against their documented signatures and
tested on CPU through stand-ins with those semantics — not yet on the hardware itself.

Shapes: q (B, H, T, d); k, v (B, KV, S, d) with H a multiple of KV (grouped-query attention); cos/sin
(T, d) in the half-split layout (see zili.models.transformer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zili import accel

# Largest batch * heads * T * T for which CPU training uses `causal_attention` (its saved attention
# probabilities cost about 1 byte per element in bf16); longer sequences use PyTorch's flash kernel, and
# so does everything without gradients (evaluation, generation), where the flash forward is faster.
MATMUL_ATTENTION_MAX_SCORES = 1 << 27
NPU_CAUSAL_MASK_SIZE = 2048  # npu_fusion_attention's compressed causal mask (sparse_mode 2) is 2048 x 2048


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 256) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, in q's dtype, with plain batched matmuls.

    For training on CPU it beats the flash kernel of `scaled_dot_product_attention` (forward + backward,
    bf16, 2 cores: 2.4x at T=512, 1.3x at T=2048), whose forward alone is faster. The H/KV query heads
    sharing a KV head are stacked into one matrix, so keys and values are never repeated. Queries go in
    blocks of `block` positions, each against the keys up to its last position only, which skips most of
    the masked upper triangle.
    """
    B, H, T, d = q.shape
    kv = k.shape[1]
    group = H // kv
    k, v = k.reshape(B * kv, T, d), v.reshape(B * kv, T, d)
    future = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
    outs = []
    with torch.autocast(q.device.type, enabled=False):  # all in q's dtype; softmax accumulates in fp32
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            q_block = q[:, :, t0:t1].reshape(B * kv, group * (t1 - t0), d)
            mask = future[t0:t1, :t1].repeat(group, 1)
            scores = torch.baddbmm(mask, q_block, k[:, :t1].transpose(1, 2), alpha=1.0 / math.sqrt(d))
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), v[:, :t1]).view(B, H, t1 - t0, d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def sdpa_attention(q, k, v, mask=None, causal: bool = True) -> torch.Tensor:
    """The fallback: PyTorch's scaled_dot_product_attention (KV heads repeated for GQA)."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None and q.shape[2] > 1)


def npu_attention(npu, q, k, v) -> torch.Tensor:
    """Causal attention through torch_npu's fused kernel (BNSD layout; GQA native)."""
    mask = torch.ones(NPU_CAUSAL_MASK_SIZE, NPU_CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu_(1)
    out = npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", atten_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
                                   keep_prob=1.0, sparse_mode=2)
    return out[0]


def flash_attention(flash, q, k, v) -> torch.Tensor:
    """Causal attention through flash-attn (B, T, H, d layout; GQA native)."""
    return flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)


_flash_checked, _flash_fn = False, None


def _flash():
    """flash-attn's function, looked up once (outside compiled code after the first call)."""
    global _flash_checked, _flash_fn
    if not _flash_checked:
        _flash_checked, _flash_fn = True, accel.flash_attn_func()
    return _flash_fn


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = True) -> torch.Tensor:
    """Attention output (B, H, T, d). `mask` (T, S) bool, True = may attend, replaces the causal mask."""
    device = _device_type(q)
    plain_causal = mask is None and causal and q.shape[2] > 1 and q.shape[2] == k.shape[2]
    if plain_causal and device == "npu" and (npu := accel.vendor_ops("npu")) is not None:
        return npu_attention(npu, q, k, v)
    if plain_causal and device == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash()
        if flash is not None:
            return flash_attention(flash, q, k, v)
    B, H, T, _ = q.shape
    if plain_causal and device == "cpu" and torch.is_grad_enabled() and B * H * T * T <= MATMUL_ATTENTION_MAX_SCORES:
        return causal_attention(q, k, v)
    return sdpa_attention(q, k, v, mask, causal)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32; returns fp32 (the caller casts)."""
    if _device_type(x) == "npu" and (npu := accel.vendor_ops("npu")) is not None:
        return npu.npu_rms_norm(x.float(), weight.float(), eps)[0]
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by position; cos/sin are (T, head_dim), half-split layout."""
    if _device_type(x) == "npu" and (npu := accel.vendor_ops("npu")) is not None:
        return npu.npu_rotary_mul(x, cos[None, None].to(x.dtype), sin[None, None].to(x.dtype))
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
