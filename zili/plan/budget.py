"""Compute-optimal advice: which model to train, on how many tokens, for a budget of chip-hours.

Chinchilla (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Table 3 and approach 1):
for a budget of C training FLOPs the loss is lowest near D = 20 tokens per parameter, and C = 6 N D, so

    N = sqrt(C / 120) parameters,  D = 20 N tokens.

C is what the chips deliver: chip-hours x 3600 x peak FLOP/s x MFU, where the MFU is the planner's for the
best layout of the proposed model; we start from 0.4 and repeat (size -> layout -> MFU -> size) until the MFU
moves by less than half a point (at most 6 rounds; when the rounds alternate between shapes — a shape's layouts
can be more or less efficient than its neighbour's — the shape nearest its own MFU's N wins, then the faster
one). The shape's size is only near N (a coarse grid), and C = 6 N D leaves out the attention, so the token
count is then set to spend the budget exactly: D = C / (the shape's model FLOPs per token, zili.models.flops,
attention included) — about 20 tokens per parameter, within the grid's rounding.

The proposed shape is zili's block (SwiGLU, GQA, untied head) with Llama-3-like proportions: dim a multiple
of 1,024 between 64 and 192 x n_layers (closest to 128 x), head size 128 (so n_heads is a multiple of 8),
8 KV heads, ffn_dim = 3.5 x dim rounded to 256, vocabulary 128,256 — about 12.6 dim^2 parameters per layer.
"""

from __future__ import annotations

import math

from zili.models.args import ModelArgs
from zili.models.flops import flops_per_token, param_counts

TOKENS_PER_PARAM = 20
START_MFU = 0.4


def shape_for(params: float, seq_len: int, vocab_size: int = 128256) -> ModelArgs:
    """A zili architecture with about `params` parameters (the one closest over layer counts), its RoPE table
    covering `seq_len` tokens."""
    best = None
    for layers in range(2, 200):
        for dim in range(1024, 192 * layers + 1, 1024):
            if dim < 64 * layers:
                continue
            args = ModelArgs(n_layers=layers, dim=dim, n_heads=dim // 128, n_kv_heads=8,
                             ffn_dim=round(3.5 * dim / 256) * 256, vocab_size=vocab_size, max_seq_len=seq_len)
            score = (round(abs(math.log(param_counts(args)["total"] / params)), 2), abs(math.log(dim / (128 * layers))))
            if best is None or score < best[0]:
                best = (score, args)
    return best[1]


def compute_optimal(chip_hours: float, peak_flops: float, mfu: float) -> tuple[float, float]:
    """(parameters, tokens) for `chip_hours` of chips with `peak_flops` FLOP/s each at `mfu`."""
    budget = chip_hours * 3600 * peak_flops * mfu
    params = math.sqrt(budget / (6 * TOKENS_PER_PARAM))
    return params, TOKENS_PER_PARAM * params


def tokens_for(chip_hours: float, peak_flops: float, mfu: float, args: ModelArgs, seq_len: int) -> float:
    """Tokens that `chip_hours` of chips at `mfu` train `args` on at `seq_len` (model FLOPs, attention
    included)."""
    return chip_hours * 3600 * peak_flops * mfu / flops_per_token(args, seq_len)


def propose(chip_hours: float, peak_flops: float, seq_len: int, best_layouts) -> tuple[ModelArgs, float, float]:
    """(args, tokens, mfu) for the budget, `peak_flops` FLOP/s per chip, sequences of `seq_len` tokens:
    `best_layouts(args, tokens)` is the planner's search (a list, best first, empty when no layout fits). If
    nothing fits, the last shape tried, for the caller to explain."""
    mfu, tried = START_MFU, []
    for _ in range(6):
        params, tokens = compute_optimal(chip_hours, peak_flops, mfu)
        args = shape_for(params, seq_len)
        layouts = best_layouts(args, tokens)
        if not layouts:
            break
        got = layouts[0]["mfu"]
        miss = abs(math.log(param_counts(args)["total"] / compute_optimal(chip_hours, peak_flops, got)[0]))
        tried.append(((round(miss, 2), -got), args, got))
        if abs(got - mfu) < 0.005:
            break
        mfu = got
    if not tried:
        return args, tokens, mfu
    _, args, mfu = min(tried, key=lambda entry: entry[0])
    return args, tokens_for(chip_hours, peak_flops, mfu, args, seq_len), mfu
