"""RMSNorm under sequence parallelism on Ascend: torch_npu's `npu_rms_norm` has no DTensor sharding rule, so
`kernels.rms_norm` runs it on each rank's shard and rewraps the result. Checked on 2 real gloo processes (CPU)
with a stand-in `npu_rms_norm` that refuses DTensors: the output, the input gradient and the weight gradient
(summed over the ranks' rows) equal those of the unsharded norm, for a sequence that does not split evenly. A
layout that splits the normalised dimension is first gathered into whole rows."""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from zili import accel, kernels

EPS = 1e-6


def npu_standin(calls: list):
    """torch_npu's npu_rms_norm (documented math: returns (y, rstd)) — for plain tensors only, like the real one."""

    def npu_rms_norm(x, gamma, epsilon):
        if isinstance(x, DTensor) or isinstance(gamma, DTensor):
            raise TypeError("npu_rms_norm: no sharding rule for DTensor")
        calls.append(tuple(x.shape))
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
        return x * rstd * gamma, rstd

    return types.SimpleNamespace(npu_rms_norm=npu_rms_norm)


def check_rank(rank: int) -> None:
    calls = []
    npu = npu_standin(calls)
    # this process is the test's own: the NPU branch is taken for CPU tensors, nothing to restore afterwards
    kernels._device_type = lambda t: "npu"
    accel.vendor_ops = lambda device_type: npu if device_type == "npu" else None
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)  # the same full tensors on both ranks
    x, grad = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    w = 1 + 0.1 * torch.randn(8, generator=g)

    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + EPS) * w_ref
    ref.backward(grad)

    # as SequenceParallel gives it: activations split along the sequence (5 = 3 + 2), the weight replicated
    xs = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    ws = nn.Parameter(distribute_tensor(w, mesh, [Replicate()]))
    out = kernels.rms_norm(xs, ws, EPS)
    assert isinstance(out, DTensor) and tuple(out.placements) == (Shard(1),) and out.shape == x.shape
    assert calls == [(2, 3 if rank == 0 else 2, 8)]  # the fused kernel ran once, on this rank's rows
    out.backward(distribute_tensor(grad, mesh, [Shard(1)]))
    torch.testing.assert_close(out.full_tensor(), ref)
    torch.testing.assert_close(xs.grad.full_tensor(), x_ref.grad)
    torch.testing.assert_close(ws.grad.full_tensor(), w_ref.grad)

    calls.clear()
    out = kernels.rms_norm(distribute_tensor(x, mesh, [Shard(2)]), ws.detach(), EPS)
    assert calls == [(2, 5, 8)] and tuple(out.placements) == (Replicate(),)
    torch.testing.assert_close(out.full_tensor(), ref.detach())


def run_rank(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check_rank(rank)
    finally:
        dist.destroy_process_group()


def test_npu_rms_norm_runs_on_each_ranks_sequence_shard(tmp_path):
    # forked, not spawned: the ranks start with torch and zili already imported (seconds saved per rank)
    mp.start_processes(run_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True, start_method="fork")
