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
from torch.distributed.tensor import Shard

from zili.parallel.expert_parallel import ExpertParallelExperts


def apply_fsdp(model, dp_mesh, compute_dtype: torch.dtype, cpu_offload: bool, reshard_after_forward: bool,
               expert_dp_mesh=None) -> None:
    """Shard `model` over `dp_mesh` in place, block by block, then the root. Expert-parallel experts
    (`zili.parallel.expert_parallel`) are a unit of their own over `expert_dp_mesh` — the data ranks that hold
    the same experts, split along each expert's rows (dim 1: the expert dim is ep's) — or, when that is None
    (no such ranks), left to expert parallelism alone."""
    mp = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,  # the residual stream keeps the dtype it has without FSDP (as autocast runs)
    )
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = list(model.blocks.values())
    ignored: set = set()
    for i, block in enumerate(blocks):
        for experts in (m for m in block.modules() if isinstance(m, ExpertParallelExperts)):
            if expert_dp_mesh is None:
                ignored |= set(experts.parameters())
            else:
                fully_shard(experts, mesh=expert_dp_mesh, mp_policy=mp, offload_policy=offload,
                            reshard_after_forward=reshard_after_forward, shard_placement_fn=lambda p: Shard(1))
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
                    ignored_params=ignored & set(block.parameters()) or None)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
