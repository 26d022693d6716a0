"""The RoPE table's float64 arithmetic runs on the CPU whatever the target device (Ascend's AI cores have no
fp64), and only fp32 tensors reach the device: checked with the meta device standing in for an accelerator,
for `rope_table` itself and for the two places that rebuild it on a model's device."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zili.models.args import ModelArgs
from zili.models.rope import rope_table
from zili.models.transformer import Transformer
from zili.parallel.init import init_weights


class Float64Devices(TorchDispatchMode):
    """Records the device of every float64 tensor that an aten op takes or returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (*args, *(kwargs or {}).values(), *(out if isinstance(out, tuple | list) else (out,))):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.devices.add(t.device.type)
        return out


def args_for(**kw):
    base = dict(n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def test_rope_table_for_another_device_uses_float64_on_the_cpu_only():
    for args in (args_for(), args_for(rope_scaling="llama3", rope_original_max_len=16, max_seq_len=128)):
        with Float64Devices() as seen:
            table = rope_table(args, device="meta")
        assert seen.devices == {"cpu"}  # the frequencies were computed in fp64 — on the CPU
        assert table.device.type == "meta" and table.dtype == torch.float32
        assert table.shape == (2, args.max_seq_len, args.head_dim)
        with Float64Devices() as seen, torch.device("meta"):  # the default device, as when building on meta
            table = rope_table(args)
        assert seen.devices == {"cpu"} and table.device.type == "meta"


def test_model_init_rebuilds_rope_without_float64_on_the_device():
    args = args_for()
    with torch.device("meta"):
        model = Transformer(args)
    for init in (lambda: model.init_weights(0), lambda: init_weights(model, 0)):
        with Float64Devices() as seen:
            init()
        assert seen.devices == {"cpu"}  # the rope table was rebuilt, its fp64 part on the CPU
        assert model.rope.device.type == "meta"


def test_rope_table_values_unchanged_on_the_cpu():
    args = args_for(rope_theta=10000.0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq.float())
    angles = torch.cat([angles, angles], -1)
    torch.testing.assert_close(rope_table(args), torch.stack([angles.cos(), angles.sin()]), rtol=0, atol=0)
