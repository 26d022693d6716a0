"""The mixture-of-experts feed-forward: a router picks `top_k` of `n_routed_experts` SwiGLU experts per token,
their outputs are summed with the router's weights, and `n_shared_experts` (one dense SwiGLU of that many times
the expert width) see every token. Free of parallelism, like the rest of the model.

Routing (`ModelArgs.score_func`):
- "softmax" (Qwen3-MoE, Mixtral): probabilities over all experts, the `top_k` largest kept;
- "sigmoid" (DeepSeek-V3): independent scores; experts fall into `n_group` groups, a group's score is the sum of
  its two best (bias-corrected) scores, and only the best `topk_group` groups are eligible. The choice ranks
  scores plus `e_score_correction_bias`, a per-expert bias that balances the load without an auxiliary loss;
  the weights use the scores without it.
Then, with `norm_topk_prob`, the kept weights are renormalised to sum to 1, and all are multiplied by
`routed_scaling_factor`.

Drop-less: every routed (token, expert) pair is computed. The pairs are sorted by expert and each expert's rows
go through its weights in one grouped matrix multiply per projection (`zili.compat.grouped_mm`): no Python loop
over experts. Expert weights are stacked: `w_gate`, `w_up` (E, moe_ffn_dim, dim) and `w_down` (E, dim,
moe_ffn_dim), each expert's slice laid out as an `nn.Linear` weight.

Balancing (two ways, both DeepSeek-V3's): the training tokens each expert received since the last update are
counted (`tokens_per_expert`); `update_bias(rate)` moves the bias by `rate` towards the mean load (up for experts
below it, down above it), DeepSeek-V3's update, and resets the count. The bias is a persistent fp32 buffer of
sigmoid-routed layers (checkpointed; Hugging Face's `mlp.gate.e_score_correction_bias`); softmax-routed layers
have none.
Optionally, with `aux_loss_coef` > 0 (set from `moe.aux_loss_coef`), a training forward also leaves
`aux_loss` = coef x the sequence-wise balance loss (`sequence_balance_loss`) for the train step to add to
the objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zili.compat import grouped_mm
from zili.models.args import ModelArgs


class Router(nn.Module):
    """Scores of every expert for every token and the `top_k` chosen (see the module doc)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # sigmoid routing only (softmax routing has no bias to balance with). fp32 whatever the compute dtype: the
        # bias moves in steps far below bf16's resolution at scores near 1
        if args.score_func == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> (weights (N, top_k) fp32, expert indices (N, top_k) int64, every expert's score (N, E)
        fp32: softmax probabilities or sigmoids, without the bias)."""
        a = self.args
        logits = F.linear(x.float(), self.weight.float())
        if a.score_func == "softmax":
            scores = logits.softmax(dim=-1)
            choice = scores
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
        if a.n_group > 1:
            grouped = choice.view(len(x), a.n_group, -1)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (N, n_group)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
                1, group_score.topk(a.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(len(x), -1)
        indices = choice.topk(a.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * a.routed_scaling_factor, indices, scores


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, without its coefficient: per sequence sum_i f_i P_i, with f_i
    = E / (top_k T) x the tokens choosing expert i and P_i the mean over the T tokens of expert i's score
    normalised over all experts; averaged over the sequences. 1.0 when every sequence spreads evenly.
    scores (N, E), indices (N, top_k) for N = B x T tokens of input `shape` (B, T, dim) (or (N, dim): one
    sequence)."""
    n_experts, k = scores.shape[1], indices.shape[1]
    batch = shape[0] if len(shape) == 3 else 1
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, -1, n_experts)
    tokens = probs.shape[1]
    chosen = indices.view(batch, tokens * k)
    counts = torch.zeros(batch, n_experts, device=scores.device).scatter_add_(
        1, chosen, torch.ones_like(chosen, dtype=torch.float32))
    return (counts * (n_experts / (k * tokens)) * probs.mean(dim=1)).sum(dim=1).mean()


class SwiGLUExperts(nn.Module):
    """`n` SwiGLU MLPs of width `ffn_dim`, applied to rows sorted by expert in grouped matrix multiplies."""

    def __init__(self, n: int, dim: int, ffn_dim: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n, ffn_dim, dim))
        self.w_up = nn.Parameter(torch.empty(n, ffn_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n, dim, ffn_dim))

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows (M, dim), the first counts[0] for expert 0, the next counts[1] for expert 1 ... -> (M, dim)."""
        return swiglu_experts(rows, counts, self.w_gate, self.w_up, self.w_down)


def swiglu_experts(rows: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """`len(counts)` SwiGLU experts on rows sorted by expert: rows (M, dim), counts (E,) rows per expert (summing
    to M), weights stacked as in `SwiGLUExperts` -> (M, dim) in the rows' dtype."""
    offs = counts.cumsum(0).to(torch.int32)
    dtype = rows.dtype

    def mm(x, w):  # w (E, out, in): each expert's slice as an nn.Linear weight
        return grouped_mm(x, w.to(dtype).transpose(-2, -1), offs)

    return mm(F.silu(mm(rows, w_gate)) * mm(rows, w_up), w_down)


class MoE(nn.Module):
    """The mixture-of-experts feed-forward of one block: (B, T, dim) -> (B, T, dim). `shared` is the dense
    SwiGLU of the shared experts (width n_shared_experts × moe_ffn_dim), or None."""

    def __init__(self, args: ModelArgs, shared: nn.Module | None = None):
        super().__init__()
        self.args = args
        self.gate = Router(args)
        self.experts = SwiGLUExperts(args.n_routed_experts, args.dim, args.moe_ffn_dim)
        self.shared_experts = shared
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts), persistent=False)
        self.aux_loss_coef = 0.0  # set from outside (moe.aux_loss_coef); > 0: `aux_loss` in training
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x)
        if self.training and self.aux_loss_coef > 0:
            self.aux_loss = self.aux_loss_coef * sequence_balance_loss(scores, indices, shape)
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert, tokens in order within
        counts = torch.bincount(flat, minlength=self.args.n_routed_experts)
        if self.training and not counts.is_meta:  # the load balancing answers to: training tokens only
            self.tokens_per_expert += counts.detach()
        k = self.args.top_k
        # every index of `order` is distinct, so neither direction accumulates: sums over a token's k experts
        # happen in a fixed order (a scatter-add would make them depend on thread timing)
        rows = x.unsqueeze(1).expand(-1, k, -1).reshape(-1, x.shape[-1])[order]
        out_rows = self.experts(rows, counts) * weights.flatten()[order, None].to(rows.dtype)
        out = torch.empty_like(out_rows).index_copy_(0, order, out_rows).view(-1, k, x.shape[-1]).sum(dim=1)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3's balancing step (after an optimizer step): every expert's bias moves by `rate` towards the
        mean load — up below it, down above it (sigmoid routing; softmax routing has no bias) — then the load
        count restarts."""
        load = self.tokens_per_expert
        if self.gate.e_score_correction_bias is not None:
            self.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()

    def load_imbalance(self) -> torch.Tensor:
        """Tokens of the busiest expert ÷ the mean, since the last `update_bias` (1.0 = perfectly even), as a
        0-dim device tensor."""
        load = self.tokens_per_expert
        return load.max() / load.mean().clamp(min=1e-9)
