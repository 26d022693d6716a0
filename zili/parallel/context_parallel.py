"""Context parallelism: every sequence split along its length over the `cp` ranks of one data-parallel
coordinate, attention kept exact by all-gathering the key material over the cp group (the Llama 3 approach),
applied from outside the model.

Causal load balancing. A sequence of T tokens is cut into 2*cp chunks of T / (2*cp); cp rank i holds chunk i and
chunk 2*cp-1-i (`load_balanced_spans`). Under a causal mask a chunk's attention work grows with its position, so
pairing an early chunk with a late one gives every rank the same work. The train step takes this rank's columns of
inputs and targets (`split_sequence`) and hands the model their positions as spans (`positions=`,
zili.models.positions): RoPE then rotates each token by its true position, and the loss is the one of cp = 1
restricted to this rank's tokens.

Attention. Each attention module passes its per-token key material through its `key_context`; `GatheredKeys`
takes that module's place (`apply_context_parallel`): it all-gathers the material of every cp rank along the
sequence (`zili.compat.all_gather_autograd`, torch's functional collective; its backward reduce-scatters each key's
gradient back to the rank that computed it) and puts it in position order. The model's causal attention by
position then runs one causal kernel call per query chunk against the keys up to that chunk's end. What is
gathered is what the model hands over: for grouped-query attention the rotated keys and the values (of this
rank's heads under tensor parallelism), for multi-head latent attention the normalised latent and the rotated
shared key — kv_lora_rank + rope numbers per token instead of the expanded per-head keys and values (about 70 x
fewer bytes for DeepSeek-V3), at the cost of each rank expanding all T latents.

Gradients. Each rank's loss is the mean over its T / cp tokens of each sequence; FSDP2 shards over dp_shard x cp
and averages gradients over those ranks, which gives the gradient of the global mean (the all-gather's backward
already summed every rank's contribution to each key). Logged losses divide by the cp ranks too.

torch's own `context_parallel` (ring attention over SDPA) dispatches only SDPA's fused CUDA kernels and does not
run on CPU SDPA, so it is not used here.
"""

from __future__ import annotations

import torch
from torch import nn

from zili.compat import all_gather_autograd
from zili.models.positions import Spans


def load_balanced_spans(seq_len: int, cp: int, rank: int) -> Spans:
    """The positions cp rank `rank` holds of a sequence of `seq_len` tokens: chunks `rank` and 2*cp-1-rank of the
    2*cp equal chunks. ValueError unless 2*cp divides seq_len."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len {seq_len} does not split into 2*cp = {2 * cp} equal chunks")
    chunk = seq_len // (2 * cp)
    late = 2 * cp - 1 - rank
    return (range(rank * chunk, (rank + 1) * chunk), range(late * chunk, (late + 1) * chunk))


def split_sequence(x: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The columns (dimension 1) of `x` (B, T, ...) at the positions of `spans`, in span order."""
    return torch.cat([x[:, s.start : s.stop] for s in spans], dim=1)


class GatheredKeys(nn.Module):
    """A `key_context` (zili.models.positions.KeyContext) returning the key material of the whole sequence: every
    cp rank's, gathered over `group` (this rank `rank` of `cp`), in position order."""

    def __init__(self, group, cp: int, rank: int):
        super().__init__()
        self.group, self.cp, self.rank = group, cp, rank

    def forward(self, spans: Spans, *tensors: torch.Tensor):
        """spans: this rank's load-balanced positions; tensors (..., T/cp, features) each -> ((range(0, T),),
        *tensors (..., T, features))."""
        local = sum(len(s) for s in spans)
        total, chunk = local * self.cp, local // 2
        if tuple(spans) != load_balanced_spans(total, self.cp, self.rank):
            raise ValueError(f"cp rank {self.rank} was given positions {spans!r}, not its load-balanced chunks "
                             f"{load_balanced_spans(total, self.cp, self.rank)!r}")
        # chunk c of the sequence: on rank c (its first half) for c < cp, else on rank 2*cp-1-c (its second half)
        starts = [c * local if c < self.cp else (2 * self.cp - 1 - c) * local + chunk for c in range(2 * self.cp)]
        ordered = []
        for t in tensors:
            gathered = all_gather_autograd(t.contiguous(), t.ndim - 2, self.group)  # rank order
            ordered.append(torch.cat([gathered.narrow(-2, start, chunk) for start in starts], dim=-2))
        return ((range(0, total),), *ordered)


def apply_context_parallel(model, cp_mesh) -> None:
    """Make every attention of `model` (a Transformer) attend over the keys of the whole sequence, gathered over
    the 1-D `cp_mesh`, in place. The model must then be called with this rank's `load_balanced_spans` as
    `positions` (the train step does, through `ParallelModel.sequence_part`)."""
    group, cp, rank = cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank()
    for block in model.blocks.values():
        block.attn.key_context = GatheredKeys(group, cp, rank)
