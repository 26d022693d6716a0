"""Rotary position embedding: the inverse frequencies (plain, Llama 3 scaling, YaRN) and the cos/sin table.

Layout: half-split (GPT-NeoX / Hugging Face) — the features rotated together are (i, i + rope_dim/2).
`rope_dim` is the features per head that rotate: the head size for grouped-query attention, `qk_rope_head_dim`
for multi-head latent attention.

YaRN (Peng et al. 2023, as DeepSeek-V3 and Hugging Face compute it): with d = rope_dim, base θ, factor s and
L = rope_original_max_len, dimension pair i keeps its frequency θ^(-2i/d) if it turns more than beta_fast times
in L positions, is interpolated to θ^(-2i/d) / s if it turns fewer than beta_slow times, and is blended linearly
(over pair indices floor(low)..ceil(high)) in between. cos and sin are multiplied by the attention factor
mscale(s, rope_mscale) / mscale(s, rope_mscale_all_dim) where both are given, else mscale(s, 1), with
mscale(s, m) = 1 + 0.1 m ln s (1 for s <= 1).
"""

from __future__ import annotations

import math

import torch

from zili.models.args import ModelArgs


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 1 + 0.1 mscale ln(factor) (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(args: ModelArgs) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, 1 otherwise."""
    if args.rope_scaling != "yarn":
        return 1.0
    if args.rope_mscale and args.rope_mscale_all_dim:
        return yarn_mscale(args.rope_factor, args.rope_mscale) / yarn_mscale(args.rope_factor, args.rope_mscale_all_dim)
    return yarn_mscale(args.rope_factor)


def _yarn(args: ModelArgs, inv_freq: torch.Tensor) -> torch.Tensor:
    d, base = args.rope_dim, args.rope_theta

    def pair_index(turns: float) -> float:  # the (fractional) pair index turning `turns` times in L positions
        return d * math.log(args.rope_original_max_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(args.rope_beta_fast)), 0)
    high = min(math.ceil(pair_index(args.rope_beta_slow)), d - 1)
    if low == high:
        high += 0.001
    pairs = torch.arange(d // 2, device="cpu", dtype=torch.float64)
    ramp = ((pairs - low) / (high - low)).clamp(0, 1)  # 1 = interpolate, 0 = keep
    return inv_freq / args.rope_factor * ramp + inv_freq * (1 - ramp)


def _llama3(args: ModelArgs, inv_freq: torch.Tensor) -> torch.Tensor:
    low_wavelen = args.rope_original_max_len / args.rope_low_freq_factor
    high_wavelen = args.rope_original_max_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (args.rope_original_max_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq
    inv_freq = torch.where(wavelen > low_wavelen, inv_freq / args.rope_factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, inv_freq)


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (rope_dim/2,) in radians per position, scaled as `args.rope_scaling` says: fp32, on
    `device` (default: the CPU). Always computed in float64 on the CPU and only the fp32 result moved: some
    accelerators have no fp64 arithmetic (Ascend's AI cores: a slow fallback or an error), and a CPU vector of
    rope_dim/2 costs nothing."""
    d = args.rope_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device="cpu", dtype=torch.float64) / d))
    if args.rope_scaling == "llama3":
        inv_freq = _llama3(args, inv_freq)
    elif args.rope_scaling == "yarn":
        inv_freq = _yarn(args, inv_freq)
    return inv_freq.float() if device is None else inv_freq.float().to(device)


def rope_table(args: ModelArgs, device=None) -> torch.Tensor:
    """cos and sin for every position: (2, max_seq_len, rope_dim), fp32, half-split layout, times the attention
    factor (YaRN), on `device` (default: the default device). Only fp32 arithmetic runs on `device` (the
    frequencies come from the CPU, see `rope_frequencies`); the table itself is built there, so that a model
    built on the meta device costs no CPU time for a table of 131072 positions."""
    positions = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(args, positions.device))
    angles = torch.cat([angles, angles], dim=-1)
    table = torch.stack([angles.cos(), angles.sin()])
    factor = attention_factor(args)
    return table if factor == 1.0 else table * factor
