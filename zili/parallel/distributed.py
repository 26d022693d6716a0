"""The process group: started from torchrun's environment, on the backend the accelerator layer names.

`torchrun --nproc-per-node N -m zili train ...` sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous
address; `init()` joins the group (gloo on CPU, nccl on CUDA/ROCm, hccl on Ascend, ...). A plain
`zili train` is a world of one and starts no process group. Helpers here are no-ops in a world of one.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from zili.accel import Accelerator
from zili.compat import set_default_collective_timeout


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


_device = torch.device("cpu")  # where collectives of small host values run (the process group's device)
_timeout_s = 1800.0  # the collective timeout `init` set


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


def init(accel: Accelerator, host_collectives: bool = False, timeout_s: float = 1800.0) -> int:
    """Join the process group if torchrun started several processes (see `group_options`); return the world
    size. A collective that waits more than `timeout_s` seconds for a peer fails (on every group, the mesh's
    included) instead of hanging: `collective_failure` turns the error into one line."""
    global _device, _timeout_s
    _device = accel.device
    world_size = env_world_size()
    if world_size > 1 and not dist.is_initialized():
        _timeout_s = timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        set_default_collective_timeout(timeout)
        dist.init_process_group(**group_options(accel, host_collectives), timeout=timeout)
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


# What the backends say when a peer never answered (gloo: "Timed out waiting 3000ms for recv operation", NCCL's
# watchdog: "Watchdog caught collective operation timeout") or went away (gloo: "Connection closed by peer",
# "Connection reset by peer"; a store: "Broken pipe").
_TIMED_OUT = ("timed out", "timeout")
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


def collective_failure(error: BaseException) -> str | None:
    """One line for a collective that timed out or lost its peer — naming this rank, the torch.distributed
    operation that waited and the zili function that called it — or None when `error` is anything else (a
    real bug keeps its traceback). Only errors raised inside torch.distributed count."""
    text = str(error).lower()
    timed_out = any(k in text for k in _TIMED_OUT)
    if not timed_out and not any(k in text for k in _PEER_GONE):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    in_dist = [f for f in frames if f"torch{os.sep}distributed{os.sep}" in f.filename]
    if not in_dist and not isinstance(error, dist.DistError):
        return None
    # the c10d function itself (all_reduce, barrier, ...) when the stack has one, else where torch.distributed began
    ops = [f.name for f in in_dist if Path(f.filename).name in ("distributed_c10d.py", "_functional_collectives.py")
           and not f.name.startswith("_")]
    operation = ops[-1] if ops else in_dist[0].name if in_dist else "a collective"
    ours = [f for f in frames if f"{os.sep}zili{os.sep}" in f.filename and f.filename != __file__]
    where = f" in {ours[-1].name} ({Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
    who = f"rank {rank() if dist.is_initialized() else os.environ.get('RANK', '?')}"
    if "connection refused" in text:  # nobody listening where the store said a peer would be
        return (f"{who}: {operation}{where} could not connect to another rank (connection refused) — check that "
                "every rank runs and that MASTER_ADDR/port are reachable; after a torchrun restart, launch with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/multi-node.md)")
    if timed_out:
        return (f"{who}: {operation}{where} waited more than distributed.timeout_s={_timeout_s:g} s for another rank "
                "— a rank stopped or is far behind (see the other ranks' logs); raise distributed.timeout_s if "
                "it was only slow")
    return (f"{who}: {operation}{where} failed: another rank went away (see its log for why) — restart from the "
            "newest checkpoint (torchrun --max-restarts does it by itself)")
