"""Kernel choices for the model's three hot spots — attention, RMSNorm, rotary embedding — by device type.

- attention: Ascend (torch_npu present) `npu_fusion_attention` (BNSD, causal sparse mode); CUDA
  `flash_attn_func` if flash-attn is installed; CPU `zili.cpu.causal_attention` (batched matmuls) when
  training at moderate length; fallback (everywhere) `scaled_dot_product_attention`.
- rms_norm: Ascend `npu_rms_norm`; fallback (everywhere, CUDA and CPU included) `F.rms_norm` in fp32.
- rope: Ascend `npu_rotary_mul`; fallback (everywhere, CUDA and CPU included) `apply_rope`.

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

from zili import accel, cpu

NPU_CAUSAL_MASK_SIZE = 2048  # npu_fusion_attention's compressed causal mask (sparse_mode 2) is 2048 x 2048


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
    if plain_causal and device == "cpu" and cpu.use_matmul_attention(q):
        return cpu.causal_attention(q, k, v)
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
