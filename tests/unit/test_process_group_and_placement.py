"""Where things live on an accelerator, checked on the CPU with stand-ins: FSDP CPU offload keeps parameters in host
memory but the RoPE buffer on the device (the "meta" device stands in for a GPU), and the process group is bound
to the device and gets a CPU backend beside NCCL when offloaded gradients must be reduced."""

from __future__ import annotations

import torch

from zili.accel import Accelerator
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel import distributed
from zili.parallel.apply import materialize

ARGS = ModelArgs(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16)


def _meta_model() -> Transformer:
    with torch.device("meta"):
        return Transformer(ARGS)


def test_offload_puts_parameters_in_host_memory_and_buffers_on_the_device():
    accelerator = torch.device("meta")  # stands in for cuda:0: anything that is not the CPU
    model = _meta_model()
    materialize(model, accelerator, offload=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.rope.device == accelerator  # the forward reads it next to the gathered weights


def test_without_offload_everything_is_on_the_device():
    model = _meta_model()
    materialize(model, torch.device("cpu"), offload=False)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}


def test_process_group_options_bind_the_accelerator_and_add_gloo_for_offload(monkeypatch):
    gpu = Accelerator(torch.device("cuda", 3))  # constructing it touches no GPU
    assert distributed.group_options(gpu) == {"backend": "nccl", "device_id": torch.device("cuda", 3)}
    offload = distributed.group_options(gpu, host_collectives=True)
    assert offload["backend"] == "cuda:nccl,cpu:gloo"
    assert distributed.group_options(Accelerator(torch.device("cpu"))) == {"backend": "gloo"}
    xpu = Accelerator(torch.device("xpu", 1))  # a non-CUDA accelerator torch knows without a vendor plugin
    assert distributed.group_options(xpu, host_collectives=True) == {"backend": "xpu:xccl,cpu:gloo",
                                                                     "device_id": torch.device("xpu", 1)}


def test_batches_reach_an_accelerator_from_page_locked_memory_without_a_host_wait(monkeypatch):
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self.clone())
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = torch.arange(6).view(2, 3)
    on_device = Accelerator(torch.device("meta")).to_device(batch)  # meta stands in for the accelerator
    assert on_device.device.type == "meta" and on_device.shape == batch.shape
    assert len(pinned) == 1 and copies == [True]
    assert Accelerator(torch.device("cpu")).to_device(batch) is batch  # the CPU needs no copy at all


def test_a_backend_without_page_locked_memory_copies_plainly(monkeypatch):
    def refuse(self):
        raise RuntimeError("pin_memory is not supported here")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    assert Accelerator(torch.device("meta")).to_device(torch.ones(2)).device.type == "meta"
