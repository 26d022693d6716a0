"""flash-attn on CUDA, through CPU stand-ins (tensors pass for "cuda" ones, fake `flash_attn` packages on the
import path): an install that does not import, or whose first call fails or computes wrong values, leaves
attention on SDPA with one warning on stderr; a working one is chosen once, and a compiled attention call
compiles once — the choice is not state that Dynamo guards on and that changes after the first trace."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from zili import accel, kernels

STANDIN_CALLS = []  # one entry per call of standin_flash that ran (not traced)


@torch.library.custom_op("zili_test::flash_attn_func", mutates_args=())
def standin_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """flash-attn's math on (B, T, H, d) tensors; a custom op, opaque to the compiler like the real one."""
    STANDIN_CALLS.append(causal)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous()


@standin_flash.register_fake
def _(q, k, v, causal):
    return torch.empty_like(q)


@pytest.fixture
def as_if_cuda(monkeypatch):
    """kernels' flash-attn decisions as in a new process, and every tensor of device type "cuda"."""
    monkeypatch.setattr(kernels, "_flash_fn", None)
    monkeypatch.setattr(kernels, "_flash_looked_up", False)
    monkeypatch.setattr(kernels, "_flash_verdicts", {})
    monkeypatch.setattr(kernels, "_device_type", lambda t: "cuda")


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """install(source): a package `flash_attn` whose __init__.py is `source`, first on the import path."""
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)

    def install(source: str) -> None:
        (tmp_path / "flash_attn").mkdir()
        (tmp_path / "flash_attn" / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    sys.modules.pop("flash_attn", None)


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, 24, 64, generator=g).to(torch.bfloat16).requires_grad_() for heads in (4, 2, 2)]


BROKEN = {
    "undefined symbol": 'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")',
    "missing library": 'raise OSError("libcudart.so.11.0: cannot open shared object file: No such file or directory")',
    "fails to load": 'raise RuntimeError("flash_attn was compiled against torch 2.4")',
    "no kernel for this GPU": (
        "def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):\n"
        "    raise RuntimeError('CUDA error: no kernel image is available for execution on the device')\n"),
    "wrong values": (
        "def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):\n"
        "    return q * 0\n"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_broken_flash_attn_falls_back_to_sdpa_with_one_warning(broken, fake_flash_attn, as_if_cuda, capsys):
    fake_flash_attn(BROKEN[broken])
    q, k, v = qkv()
    outs = [kernels.attention(q, k, v) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, kernels.sdpa_attention(q, k, v), rtol=0, atol=0)
    outs[0].float().sum().backward()  # and training goes on
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: flash-attn")]
    assert len(warnings) == 1, warnings
    assert "scaled_dot_product_attention" in warnings[0]


def test_working_flash_attn_is_used(fake_flash_attn, as_if_cuda, capsys):
    fake_flash_attn("from tests.unit.test_kernels_flash import standin_flash as flash_attn_func\n")
    q, k, v = qkv()
    with torch.no_grad():  # (the stand-in has no backward)
        out = kernels.attention(q, k, v)  # looks flash-attn up, tries it once, uses it
        calls = len(STANDIN_CALLS)
        kernels.attention(q, k, v)
    assert len(STANDIN_CALLS) == calls + 1
    torch.testing.assert_close(out, kernels.sdpa_attention(q, k, v), atol=2e-2, rtol=2e-2)
    assert capsys.readouterr().err == ""


def test_compiled_attention_compiles_once(as_if_cuda, monkeypatch):
    monkeypatch.setattr(accel, "flash_attn_func", lambda: standin_flash)
    graphs = []

    def count(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compiler.reset()
    STANDIN_CALLS.clear()
    try:
        compiled = torch.compile(kernels.attention, backend=count)
        with torch.no_grad():
            first = compiled(*qkv(0))
            compiled(*qkv(1))
            compiled(*qkv(2))
    finally:
        torch.compiler.reset()
    assert len(graphs) == 1  # no recompilation after the first call
    flash_calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.zili_test.flash_attn_func.default]
    assert len(flash_calls) == 1  # the compiled graph calls flash-attn, decided outside it
    assert len(STANDIN_CALLS) == 1 + 3  # the trial call, then each compiled call
    torch.testing.assert_close(first, kernels.sdpa_attention(*qkv(0)), atol=2e-2, rtol=2e-2)
