"""The one place for torch version shims and torch private APIs. Everything else in zili imports public torch
API only; when torch moves or changes a private name, this file is what to fix.

- `local_region(global_shape, mesh, placements)`: where this rank's shard of a DTensor lies in the full
  tensor, through `torch.distributed.tensor._utils.compute_local_shape_and_global_offset` (private; it
  understands `_StridedShard`, the placement FSDP2 gives a parameter already sharded by tensor parallelism).
- `checkpoint_wrapper`, `flatten_mesh`: activation checkpointing per block, one collective over two mesh dims.
- `fake_world`, `fake_tensor_mode`, `clear_sharding_cache`: one rank of a large world without its hardware
  (`zili plan --verify`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as _checkpoint_wrapper
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.debug import _clear_sharding_prop_cache
from torch.distributed.tensor.placement_types import _StridedShard


def _indices_along(dim: int, size: int, mesh, placements: Sequence) -> torch.Tensor:
    """The indices along tensor dimension `dim` (of `size`) that this rank holds: shard a probe arange(size)
    with the placements that act on `dim`, locally (no communication, O(size) work)."""
    probe = []
    for p in placements:
        if isinstance(p, _StridedShard) and p.dim == dim:
            probe.append(_StridedShard(0, split_factor=p.split_factor))
        elif isinstance(p, Shard) and not isinstance(p, _StridedShard) and p.dim == dim:
            probe.append(Shard(0))
        else:
            probe.append(Replicate())
    return distribute_tensor(torch.arange(size), mesh, probe, src_data_rank=None).to_local().cpu()


def local_region(global_shape: Sequence[int], mesh, placements: Sequence) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) per dimension of this rank's shard of a DTensor of `global_shape` laid out by
    `placements` on `mesh`: the shard is full[offsets[d] : offsets[d] + sizes[d]] in every dimension d.
    RuntimeError if the shard is not such a hyper-rectangle (a strided sharding that interleaves rows)."""
    sizes, offsets = compute_local_shape_and_global_offset(tuple(global_shape), mesh, tuple(placements))
    sizes, offsets = tuple(int(s) for s in sizes), tuple(int(o) for o in offsets)
    for p in placements:
        if not isinstance(p, _StridedShard):
            continue  # nested plain Shards cut contiguous pieces of contiguous pieces
        dim = p.dim % len(global_shape)
        held = _indices_along(dim, global_shape[dim], mesh, placements)
        if not torch.equal(held, torch.arange(offsets[dim], offsets[dim] + sizes[dim])):
            raise RuntimeError(f"placements {tuple(placements)} give this rank non-contiguous indices along dim "
                               f"{dim} of a tensor of shape {tuple(global_shape)} — not a region")
    return offsets, sizes


def checkpoint_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    """`module` recomputing its activations in backward (torch's private `checkpoint_wrapper`, as torchtitan
    uses it: non-reentrant, names gain `_checkpoint_wrapped_module.`, which state dicts strip)."""
    return _checkpoint_wrapper(module, preserve_rng_state=False)


def flatten_mesh(mesh, dims: tuple[str, ...], name: str) -> None:
    """Register the flattened sub-mesh `mesh[dims]` as `name` (DeviceMesh's private `_flatten`, the documented
    way to reduce over several mesh dimensions in one collective)."""
    mesh[dims]._flatten(name)


def fake_world(rank: int, world_size: int) -> None:
    """Join a process group of `world_size` ranks whose collectives do nothing (torch's testing `fake`
    backend), as rank `rank`: for measuring one rank of a large layout on one machine."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # testing module: import only when used

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def fake_tensor_mode():
    """Tensors without storage (FakeTensorMode), real tensors allowed as inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def clear_sharding_cache() -> None:
    """Drop DTensor's cached sharding decisions (keyed by mesh shape): after a world is destroyed, a later
    world of the same shape would otherwise get its dead process groups."""
    _clear_sharding_prop_cache()
