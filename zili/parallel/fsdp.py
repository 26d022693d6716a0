"""Fully sharded data parallelism (FSDP2, `fully_shard`): each decoder block is one all-gather /
reduce-scatter unit, the rest of the model (embedding, final norm, head) the root unit.

On a 1-D mesh this is FSDP (ZeRO-3); on the 2-D (dp_replicate, dp_shard) mesh it is HSDP: parameters are
sharded within a dp_shard group and replicated across groups, gradients reduce-scattered within and
all-reduced across. Mixed precision: parameters are gathered in the compute dtype (bf16) and gradients
reduced in fp32; master weights and optimizer state stay fp32 and sharded.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(model, dp_mesh, compute_dtype: torch.dtype, cpu_offload: bool, reshard_after_forward: bool) -> None:
    """Shard `model` over `dp_mesh` in place, block by block, then the root."""
    mp = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,  # the residual stream keeps the dtype it has without FSDP (as autocast runs)
    )
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = list(model.blocks.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
