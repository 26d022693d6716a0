"""Attention on CUDA in bf16 through `zili.kernels.attention` against the textbook formula in fp64: the SDPA path
as training takes it (causal, grouped-query; output and the gradients of q, k, v; under SDPA's own choice and
under each of its fused kernels), the SDPA path of generation (a few new queries against cached keys, explicit
mask), and the flash-attn path when the package is installed."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.unit.test_kernels import textbook_attention
from zili import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The inputs are exact in bf16 and the reference is fp64 on them, so the error is the kernel's own: its bf16
# softmax probabilities and output (~2e-3 relative each). A wrong mask, scale or GQA mapping is off by O(1).
OUT_TOL, GRAD_TOL = 1e-2, 3e-2
B, H, KV, T, D = 2, 8, 2, 256, 64  # 8 query heads on 2 KV heads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def bf16_inputs(queries: int = T):
    g = torch.Generator().manual_seed(0)
    shapes = [(B, H, queries, D), (B, KV, T, D), (B, KV, T, D)]
    return [torch.randn(s, generator=g).to("cuda", torch.bfloat16).requires_grad_() for s in shapes]


def check_training_path(record_property) -> None:
    """Causal attention forward and backward through `kernels.attention` against the fp64 textbook."""
    q, k, v = bf16_inputs()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    out = kernels.attention(q, k, v)
    out.backward(grad_out)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]  # the reference on the CPU
    ref = textbook_attention(*leaves)
    ref.backward(grad_out.cpu().double())
    errors = {"out": relative_error(out, ref)}
    errors.update({f"d{n}": relative_error(t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), leaves)})
    record_property("rel_errors", {name: round(e, 5) for name, e in errors.items()})
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert errors["out"] < OUT_TOL, errors
    assert max(errors["dq"], errors["dk"], errors["dv"]) < GRAD_TOL, errors


def spy(monkeypatch, name: str) -> list:
    """Record the calls of `kernels.<name>` (attention looks it up at call time)."""
    calls, original = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **kw: calls.append(name) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("backend", [None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION],
                         ids=["sdpa-default", "sdpa-cudnn", "sdpa-flash"])
def test_sdpa_training_path_matches_textbook(backend, monkeypatch, record_property):
    """The default is what training runs (cuDNN's kernel on sm90 with a recent cuDNN, else flash); each fused
    kernel alone is checked too — restricted to it, any fallback (to the math kernel) is an error."""
    monkeypatch.setattr(kernels, "flash_works", lambda device, dtype: False)  # SDPA even where flash-attn works
    calls = spy(monkeypatch, "sdpa_attention")
    try:
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            check_training_path(record_property)
    except RuntimeError as e:
        if backend == SDPBackend.CUDNN_ATTENTION and "No available kernel" in str(e):
            pytest.skip(f"SDPA's cuDNN kernel is not available here: {e}")  # optional; flash is the must
        raise
    assert calls == ["sdpa_attention"]


def test_sdpa_generation_path_matches_textbook(record_property):
    q, k, v = bf16_inputs(queries=5)  # 5 new queries at positions 251..255 against 256 cached keys
    mask = (torch.arange(T)[None, :] <= torch.arange(T - 5, T)[:, None]).cuda()
    with torch.no_grad():
        out = kernels.attention(q, k, v, mask, causal=False)
    ref = textbook_attention(*(t.detach().cpu() for t in (q, k, v)), mask.cpu())
    record_property("rel_error", round(relative_error(out, ref), 5))
    assert relative_error(out, ref) < OUT_TOL


def test_flash_attn_path_matches_textbook(monkeypatch, record_property):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (an optional package)")
    monkeypatch.setattr(kernels, "_flash_fn", None)  # decide afresh, as a new process does
    monkeypatch.setattr(kernels, "_flash_looked_up", False)
    monkeypatch.setattr(kernels, "_flash_verdicts", {})
    assert kernels.flash_works(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16), \
        "flash-attn is installed but does not work on this GPU (see the warning on stderr)"
    calls = spy(monkeypatch, "flash_attention")
    check_training_path(record_property)
    assert calls == ["flash_attention"]
