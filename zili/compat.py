"""The one place for torch version shims and torch private APIs. Everything else in zili imports public torch
API only; when torch moves or changes a private name, this file is what to fix.

- `local_region(global_shape, mesh, placements)`: where this rank's shard of a DTensor lies in the full
  tensor, through `torch.distributed.tensor._utils.compute_local_shape_and_global_offset` (private; it
  understands `_StridedShard`, the placement FSDP2 gives a parameter already sharded by tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
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
