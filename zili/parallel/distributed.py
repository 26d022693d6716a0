"""The process group: started from torchrun's environment, on the backend the accelerator layer names.

`torchrun --nproc-per-node N -m zili train ...` sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous
address; `init()` joins the group (gloo on CPU, nccl on CUDA/ROCm, hccl on Ascend, ...). A plain
`zili train` is a world of one and starts no process group. Helpers here are no-ops in a world of one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from zili.accel import Accelerator


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


_device = torch.device("cpu")  # where collectives of small host values run (the process group's device)


def group_options(accel: Accelerator, host_collectives: bool = False) -> dict:
    """Keyword arguments of `init_process_group` for this process's device: its backend — plus gloo for CPU
    tensors when `host_collectives` (FSDP CPU offload keeps gradients in host memory, and the gradient norm is
    reduced over them: "cuda:nccl,cpu:gloo") — and, on an accelerator, the device to bind the group to (NCCL &
    co. then create communicators at once, and meshes split groups from them)."""
    backend = accel.backend
    if host_collectives and accel.type != "cpu":
        backend = f"{accel.type}:{backend},cpu:gloo"
    options = {"backend": backend}
    if accel.type != "cpu":
        options["device_id"] = accel.device
    return options


def init(accel: Accelerator, host_collectives: bool = False) -> int:
    """Join the process group if torchrun started several processes (see `group_options`); return the world
    size."""
    global _device
    _device = accel.device
    world_size = env_world_size()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(**group_options(accel, host_collectives))
        # every rank past the rendezvous before any goes on: a rank that stops at once (a bad layout is reported
        # by all) must not take rank 0's store down while a peer still reads from it
        dist.barrier()
    return world_size


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`value` reduced over all ranks ("sum" or "max"), as a new tensor."""
    out = value.detach().to(_device, copy=True)
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return out


def broadcast_text(text: str, device: torch.device) -> str:
    """Rank 0's `text` on every rank (as a byte tensor: nothing is pickled)."""
    if not dist.is_initialized():
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = data if is_main() else torch.zeros(int(length), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode()


def all_gather_rows(values: torch.Tensor) -> torch.Tensor:
    """The (n,) tensors of all ranks stacked into (world_size, n) (same n on every rank)."""
    if not dist.is_initialized():
        return values[None]
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values)
    return torch.stack(out)
