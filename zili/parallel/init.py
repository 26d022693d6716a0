"""Materialise a (sharded) model's starting weights, each rank computing or reading only its own shard.

Contract: `init_weights(model, seed, initial_value=None)` fills every parameter of `model` — plain, or a
DTensor sharded by FSDP2 and/or tensor parallelism in any layout — and recomputes the RoPE buffer; the
persistent buffers (the experts' balancing bias) start at zero, or from `initial_value` when given. A plain
parameter's region is the whole tensor; a DTensor's is its local shard: `offsets`/`sizes` per dimension in
the full tensor (`zili.compat.local_region`). The values come from `initial_value(name, full_shape, offsets,
sizes) -> fp32 tensor of shape sizes` (e.g. `zili.interop.import_hf.HFWeights`, which reads just that
slice), or else from the model's own init (`Transformer.initial_value`), whose elements depend only on
(seed, name, index): either way the full tensors are the same in every layout, while each rank pays
for 1/shards of them. Names are canonical (`zili.models.transformer.canonical_name`).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from zili.compat import local_region
from zili.models.init import full_region
from zili.models.transformer import canonical_name


def shard_region(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the part of parameter `p`'s full tensor that this rank holds."""
    if not isinstance(p, DTensor):
        return full_region(p.shape)
    offsets, sizes = local_region(p.shape, p.device_mesh, p.placements)
    local = tuple(p.to_local().shape)
    if sizes != local:  # a layout torch's shard arithmetic gets wrong must not start training on wrong weights
        raise RuntimeError(f"shard of shape {local} but placements {p.placements} on mesh {p.device_mesh} imply "
                           f"{sizes} for a tensor of shape {tuple(p.shape)}")
    return offsets, sizes


@torch.no_grad()
def init_weights(model, seed: int, initial_value=None) -> None:
    """Give every parameter of `model` this rank's part of its initial value (see the module doc)."""
    model.init_buffers()
    for name, p in model.named_parameters():
        name = canonical_name(name)
        local = p.to_local() if isinstance(p, DTensor) else p
        offsets, sizes = shard_region(p)
        if initial_value is None:
            value = model.initial_value(name, tuple(p.shape), seed, offsets, sizes, device=local.device)
        else:
            value = initial_value(name, tuple(p.shape), offsets, sizes)
        if tuple(value.shape) != sizes:
            raise RuntimeError(f"initial value of {name} for region {offsets}+{sizes} has shape {tuple(value.shape)}")
        local.copy_(value)
    if initial_value is not None:
        parameters = {canonical_name(name) for name, _ in model.named_parameters()}
        for name, buffer in model.state_dict(keep_vars=True).items():
            if canonical_name(name) not in parameters:
                buffer.copy_(initial_value(canonical_name(name), tuple(buffer.shape), *full_region(buffer.shape)))
