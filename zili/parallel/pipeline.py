"""Pipeline parallelism with `torch.distributed.pipelining`: cut the model into stages, run a schedule.

Stages: the decoder blocks are split into `pp * stages_per_rank` contiguous groups of near-equal size
(earlier stages take the remainder); stage 0 also holds the embedding, the last stage the final norm and
the head. A stage is a deep copy of the (meta-device) model with the other parts removed, so parameter
names stay those of the whole model and checkpoints reshard between pipelined and plain layouts.

Placement: stage s lives on pp rank s % pp ("loop" order), as the interleaved schedules expect
(Interleaved1F1B, and InterleavedZeroBubble, which splits each backward into its input-gradient and
weight-gradient halves to fill the bubble). The V-shaped ZBVZeroBubble is not offered: its forward-only
`eval` fails in torch 2.13.

The schedule splits the local batch into `pp_microbatches` along the batch dimension, computes the mean
loss of each micro-batch on the last stage and scales gradients by 1/microbatches, so the gradient is that
of the mean loss over the local batch, exactly as without pipelining.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.pipelining.schedules import get_schedule_class

from zili.compat import PipelineSchedule, pipeline_stage


def layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer indices per stage, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def stage_ids(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stage indices held by pipeline rank `pp_rank`."""
    return [pp_rank + k * pp for k in range(per_rank)]


def stage_module(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of `model` (build it on the meta device) holding only stage `stage`'s parts."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layer_ranges(len(model.blocks), n_stages)[stage]}
    for name in [n for n in part.blocks if n not in keep]:
        del part.blocks[name]
    if stage != 0:
        part.embed = None
    if stage != n_stages - 1:
        part.norm = None
        part.lm_head = None
    return part


def build_schedule(parts: list[nn.Module], ids: list[int], n_stages: int, device, pp_group, schedule: str,
                   microbatches: int, loss_fn) -> PipelineSchedule:
    """The pipeline schedule running this rank's stages `parts` (materialised) with indices `ids`."""

    def make_stages() -> list:
        return [pipeline_stage(part, i, n_stages, device, pp_group) for part, i in zip(parts, ids)]

    return PipelineSchedule(get_schedule_class(schedule), make_stages, microbatches, loss_fn)
