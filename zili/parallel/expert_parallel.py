"""Expert parallelism: each mixture-of-experts layer's routed experts split over the `ep` ranks of an expert
group, tokens sent to the rank holding their expert and back with torch.distributed's autograd-aware
`all_to_all_single` (variable splits; any backend, gloo included).

Applied from outside, like tensor parallelism: `apply_expert_parallel(model, ep_mesh)` turns each
`SwiGLUExperts` weight into a DTensor sharded by expert (Shard(0)) over the 1-D `ep_mesh` — full shapes and
names stay, so checkpoints reshard between any ep degrees — and gives the module an expert-parallel forward
(`ExpertParallelExperts`). The router, the shared experts and the rest of the block are untouched: every rank
routes its own tokens over all experts; only the routed rows travel.

One forward, for rows already sorted by (global) expert with `counts` rows each, as `MoE.forward` makes them:
1. the per-expert counts go to every rank of the group (an all-to-all of E integers), from which each rank
   knows how many rows it sends to and receives from each peer (one host sync per layer, as any drop-less
   dispatch needs);
2. the rows go to the ranks holding their experts (all-to-all), arriving grouped by source rank, then by
   local expert; they are reordered by local expert and computed with one grouped matmul per projection on
   the local weights;
3. the results are put back in arrival order and returned to their source ranks (the reverse all-to-all).

Gradients. Each rank's loss is the mean over its own tokens and data-parallel gradients are averaged over
ranks, but an expert's local gradient already sums the contributions of the `ep` ranks that sent it rows: it
is scaled by 1/ep on the way back, so that after the average over the remaining data ranks (FSDP over
`expert_fsdp` ranks, or none) every gradient is that of the global mean loss, as on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from zili.models.moe import MoE, SwiGLUExperts, swiglu_experts


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _all_to_all(rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(receive), rows.shape[1]))
    return dist_fn.all_to_all_single(out, rows, output_split_sizes=receive, input_split_sizes=send, group=group)


class ExpertParallelExperts(SwiGLUExperts):
    """`SwiGLUExperts` whose stacked weights are DTensors sharded by expert over `ep_mesh` (set by
    `apply_expert_parallel`): same inputs and outputs, computed by the ranks that hold the experts."""

    ep_mesh = None

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        group, ep = self.ep_mesh.get_group(), self.ep_mesh.size()
        local = len(counts) // ep
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)
        send_counts, received = counts.view(ep, local), received.view(ep, local)  # [peer, local expert]
        sizes = torch.cat([send_counts.sum(1), received.sum(1)]).tolist()  # the one host sync
        send, receive = sizes[:ep], sizes[ep:]
        arrived = _all_to_all(rows, send, receive, group)
        # arrival order is (source rank, local expert); the grouped matmul wants (local expert, source rank)
        chunk = torch.arange(ep * local, device=rows.device).repeat_interleave(received.flatten(),
                                                                              output_size=len(arrived))
        order = (chunk % local * ep + chunk // local).argsort(stable=True)
        weights = [_ScaleGrad.apply(w.to_local(), 1.0 / ep) for w in (self.w_gate, self.w_up, self.w_down)]
        out = swiglu_experts(arrived[order], received.sum(0), *weights)
        back = torch.empty_like(out).index_copy(0, order, out)
        return _all_to_all(back, receive, send, group)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Shard every routed-expert stack of `model` (on the meta device, before FSDP) over `ep_mesh`, in place."""
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        experts = layer.experts
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))
        experts.__class__ = ExpertParallelExperts
        experts.ep_mesh = ep_mesh


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The expert-parallel weights of `model` (DTensors over the ep mesh): FSDP shards them over the expert
    mesh's data ranks, not with the rest of the block."""
    return {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()
            if isinstance(p, DTensor)}
