"""Kernel choices for the model's three hot spots — attention, RMSNorm, rotary embedding — by device type.

- attention: Ascend (torch_npu present) `npu_fusion_attention` (BNSD, causal sparse mode); CUDA
  `flash_attn_func` if flash-attn is installed and works on this device; CPU `zili.cpu.causal_attention`
  (batched matmuls) when training at moderate length; fallback (everywhere) `scaled_dot_product_attention`.
- rms_norm: Ascend `npu_rms_norm` (on each rank's shard for sequence-parallel DTensors); fallback
  (everywhere, CUDA and CPU included) `F.rms_norm` in fp32.
- rope: Ascend `npu_rotary_mul`; fallback (everywhere, CUDA and CPU included) `apply_rope`.

Vendor modules come from the accelerator layer (`zili.accel.vendor_ops`, `flash_attn_func`); nothing here
imports them. Every fused path has the pure-PyTorch fallback, which the CPU tests compare with textbook
formulas; the Ascend and flash-attention paths are implemented against their documented signatures and
tested on CPU through stand-ins with those semantics — not yet on the hardware itself.

What is decided once per process — whether flash-attn works here, whether SDPA's fused kernels take grouped KV
heads, the NPU's causal mask — is decided by functions marked `torch.compiler.assume_constant_result` that
return a bool: under torch.compile Dynamo runs them at trace time and keeps their answer in the graph, instead
of tracing a cache whose state changes after the first trace (a guard on that state would compile every graph
twice).

Shapes: q (B, H, T, d); k, v (B, KV, S, d) with H a multiple of KV (grouped-query attention); cos/sin
(T, d) in the half-split layout (see zili.models.transformer).
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.nn.attention import SDPBackend, sdpa_kernel

from zili import accel, cpu

NPU_CAUSAL_MASK_SIZE = 2048  # npu_fusion_attention's compressed causal mask (sparse_mode 2) is 2048 x 2048
# The flash-attn probe: (B, T, H, d) small enough to cost nothing, head size one that every build supports;
# outputs within FLASH_PROBE_ATOL of SDPA's (both in bf16/fp16, values of order 1) count as agreeing.
FLASH_PROBE_SHAPE = (1, 16, 2, 64)
FLASH_PROBE_ATOL = 0.05
# SDPA's kernels other than the math one (that torch release's members of the enum)
FUSED_SDPA_BACKENDS = [getattr(SDPBackend, name) for name in
                       ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE")
                       if hasattr(SDPBackend, name)]


_gqa_verdicts: dict[tuple[torch.device, torch.dtype, bool], bool] = {}


@torch.compiler.assume_constant_result
def fused_sdpa_takes_gqa(device: torch.device, dtype: torch.dtype, masked: bool) -> bool:
    """Whether one of SDPA's fused kernels takes fewer KV heads than query heads as they are (`enable_gqa`) on
    `device` at `dtype`, with an explicit mask (`masked`) or causal. Otherwise `enable_gqa` would send the call
    to the math kernel, which materialises the scores (and repeats K and V itself). It varies by device, dtype
    and torch release (CUDA: the flash kernel does, fp16/bf16 without a mask, the memory-efficient one does not;
    CPU: torch 2.13's flash kernel does, 2.6's did not), so it is tried once per combination on a tiny input,
    math excluded. Decided eagerly even under torch.compile (see the module doc)."""
    key = (device, dtype, masked)
    if key not in _gqa_verdicts:
        q = torch.zeros(1, 2, 4, 64, device=device, dtype=dtype, requires_grad=True)
        kv = torch.zeros(1, 1, 4, 64, device=device, dtype=dtype, requires_grad=True)
        mask = torch.ones(4, 4, dtype=torch.bool, device=device).tril() if masked else None
        try:
            with warnings.catch_warnings(), sdpa_kernel(FUSED_SDPA_BACKENDS):
                warnings.simplefilter("ignore")  # SDPA explains at length why no fused kernel fits
                F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, is_causal=not masked, enable_gqa=True)
            _gqa_verdicts[key] = True
        except Exception:  # "No available kernel" — or a vendor's SDPA refusing in its own way: repeat KV heads
            _gqa_verdicts[key] = False
    return _gqa_verdicts[key]


def sdpa_attention(q, k, v, mask=None, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """The fallback: PyTorch's scaled_dot_product_attention. Grouped-query attention goes in as it is
    (`enable_gqa`) where a fused kernel reads each KV head for its H/KV query heads (`fused_sdpa_takes_gqa`), so
    no copy of K and V at query-head width is made, nor kept for backward; elsewhere KV heads are repeated
    first, which keeps the fused kernels that need as many KV heads as query heads (same values)."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and not fused_sdpa_takes_gqa(q.device, q.dtype, mask is not None):
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None and q.shape[2] > 1,
                                          scale=scale, enable_gqa=gqa)


_npu_causal_masks: dict[torch.device, torch.Tensor] = {}


@torch.compiler.assume_constant_result
def _build_npu_causal_mask(device: torch.device) -> bool:
    """Puts `device`'s mask into `_npu_causal_masks` unless it is there; True. (A bool, not the tensor: Dynamo
    keeps a constant tensor under the function's name and, past a graph break, would hand on the function.)"""
    if device not in _npu_causal_masks:
        _npu_causal_masks[device] = torch.ones(NPU_CAUSAL_MASK_SIZE, NPU_CAUSAL_MASK_SIZE, dtype=torch.bool,
                                               device=device).triu_(1)
    return True


def npu_causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask that npu_fusion_attention's sparse_mode 2 reads (NPU_CAUSAL_MASK_SIZE square,
    True above the diagonal = masked), built once per device and shared by every call: it does not depend on
    the sequence length. Never modify it. Under torch.compile it is built at trace time (see the module doc)
    and each graph reads the same tensor."""
    _build_npu_causal_mask(device)
    return _npu_causal_masks[device]


def npu_attention(npu, q, k, v, scale: float | None = None) -> torch.Tensor:
    """Causal attention through torch_npu's fused kernel (BNSD layout; GQA native)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", atten_mask=npu_causal_mask(q.device),
                                   scale=scale, keep_prob=1.0, sparse_mode=2)
    return out[0]


def flash_attention(flash, q, k, v, scale: float | None = None) -> torch.Tensor:
    """Causal attention through flash-attn (B, T, H, d layout; GQA native)."""
    extra = {} if scale is None else {"softmax_scale": scale}
    return flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **extra).transpose(1, 2)


_flash_fn = None  # flash-attn's function once looked up (None: not installed, or it does not import)
_flash_looked_up = False
_flash_verdicts: dict[tuple[torch.device, torch.dtype], bool] = {}


def _flash_probe(flash, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one small causal call of `flash` on `device` at `dtype` runs and agrees with SDPA. A build for
    another torch, CUDA or GPU generation imports fine and fails only here ("no kernel image", undefined
    symbols loaded lazily): that prints one warning on stderr and gives False."""
    generator = torch.Generator().manual_seed(0)  # a CPU generator: the training RNG streams stay untouched
    q, k, v = (torch.randn(FLASH_PROBE_SHAPE, generator=generator).transpose(1, 2).to(device, dtype)
               for _ in range(3))
    try:
        with torch.no_grad():
            error = (flash_attention(flash, q, k, v).float() - sdpa_attention(q, k, v).float()).abs().max().item()
        if not error <= FLASH_PROBE_ATOL:  # NaN included
            raise RuntimeError(f"its output differs from scaled_dot_product_attention's by {error}")
    except Exception as failure:  # a broken extension can raise anything; training must not die of it
        print(f"warning: flash-attn does not work on {device} in {dtype} ({type(failure).__name__}: {failure}); "
              "attention uses PyTorch's scaled_dot_product_attention", file=sys.stderr)
        return False
    return True


@torch.compiler.assume_constant_result
def flash_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention on `device` at `dtype` may use flash-attn: installed, importable (`accel.flash_attn_func`)
    and passing `_flash_probe`. Decided once per (device, dtype), eagerly even under torch.compile (see the
    module doc); afterwards `_flash_fn` is the function to call."""
    global _flash_fn, _flash_looked_up
    key = (device, dtype)
    if key not in _flash_verdicts:
        if not _flash_looked_up:
            _flash_fn, _flash_looked_up = accel.flash_attn_func(), True
        _flash_verdicts[key] = _flash_fn is not None and _flash_probe(_flash_fn, device, dtype)
    return _flash_verdicts[key]


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Attention output (B, H, T, dv) for q (B, H, T, d), k (B, KV, S, d), v (B, KV, S, dv). `causal` with S >= T:
    the queries are the last T of the S key positions, query i seeing keys 0..S-T+i (bottom-right aligned, as
    after a generation cache or for one chunk of a sequence against all keys before it). `mask` (T, S) bool (or
    (B, 1, T, S): one per row), True = may attend, replaces the causal mask; `scale` multiplies q·k (default
    1/sqrt(d)). The fused vendor kernels are used for square causal attention where values have the head size of
    queries and keys (MLA's do not: SDPA then); CPU training's matmul attention also takes S > T."""
    device = _device_type(q)
    T, S = q.shape[2], k.shape[2]
    plain_causal = mask is None and causal and T > 1 and T == S
    same_head_size = v.shape[-1] == q.shape[-1]
    if plain_causal and same_head_size and device == "npu" and (npu := accel.vendor_ops("npu")) is not None:
        return npu_attention(npu, q, k, v, scale)
    if (plain_causal and same_head_size and device == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and flash_works(q.device, q.dtype)):
        return flash_attention(_flash_fn, q, k, v, scale)
    if mask is None and causal and 1 < T <= S and device == "cpu" and cpu.use_matmul_attention(q, S):
        return cpu.causal_attention(q, k, v, scale=scale)
    if mask is None and causal and 1 < T < S:  # SDPA's is_causal aligns the corner top-left: say it with a mask
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    return sdpa_attention(q, k, v, mask, causal, scale)


def _whole_rows(x: DTensor) -> list:
    """x's placements with each one that splits the rows of the last dimension (a shard of it, partial sums)
    replaced by Replicate: the layout in which every rank holds whole rows. Sequence parallelism's (sharded
    along the sequence) already is one."""
    last = x.ndim - 1
    return [p if p.is_replicate() or (p.is_shard() and p.dim % x.ndim != last) else Replicate() for p in x.placements]


def _contiguous_stride(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of `shape`."""
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _npu_rms_norm_sharded(npu, x: DTensor, weight: DTensor, eps: float) -> DTensor:
    """npu_rms_norm, which has no DTensor sharding rule, on this rank's shard of `x` (first made of whole rows if
    it is not: the norm is over the last dimension), rewrapped with the shard's placements. `weight` is a
    DTensor on x's mesh."""
    rows = _whole_rows(x)
    if tuple(rows) != tuple(x.placements):  # never for sequence parallelism: nothing moves
        x = x.redistribute(placements=rows)
    if any(not p.is_replicate() for p in weight.placements):
        weight = weight.redistribute(placements=[Replicate()] * weight.device_mesh.ndim)
    # A rank sees only its rows, so the weight gradient it computes is its rows' part of the sum over all rows:
    # Partial along every mesh dimension that shards x, which DTensor sums over the ranks.
    grad_placements = [Partial() if p.is_shard() else Replicate() for p in x.placements]
    out = npu.npu_rms_norm(x.to_local().float(), weight.to_local(grad_placements=grad_placements).float(), eps)[0]
    # shape and stride given: a sequence that does not split evenly over the ranks keeps its true length
    return DTensor.from_local(out.contiguous(), x.device_mesh, x.placements, run_check=False, shape=x.shape,
                              stride=_contiguous_stride(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32; returns fp32 (the caller casts). DTensors in, DTensors out (the same
    placements, unless those split the normalised dimension)."""
    if _device_type(x) == "npu" and (npu := accel.vendor_ops("npu")) is not None:
        if not isinstance(x, DTensor):
            return npu.npu_rms_norm(x.float(), weight.float(), eps)[0]
        if isinstance(weight, DTensor) and weight.device_mesh == x.device_mesh:
            return _npu_rms_norm_sharded(npu, x, weight, eps)
        # a DTensor with a weight that is not (on its mesh): whatever PyTorch's DTensor rule for F.rms_norm does
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by position; cos/sin are (T, head_dim), or (B, 1, T, head_dim) when each
    row has its own positions; half-split layout."""
    if _device_type(x) == "npu" and (npu := accel.vendor_ops("npu")) is not None:
        if cos.dim() == 2:
            cos, sin = cos[None, None], sin[None, None]
        return npu.npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype))
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
