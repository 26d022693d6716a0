"""The math of GRPO (group relative policy optimisation) on plain tensors: group-normalised advantages, the
PPO-clipped policy loss with an optional KL penalty to a frozen reference, per-token log-probabilities and
the entropy metric. No model, sampling or distributed code here — the RL trainer feeds these functions.

Shapes and units. B sequences (= prompts x G completions, prompt-major: the G completions of prompt 0 come
first), T token positions, V vocabulary entries. Log-probabilities are natural logs (nats), computed and
returned in fp32. `mask` (B, T) is True (or 1) on the completion tokens that count: prompt tokens and padding
are False. Values at masked-out positions may be anything, inf and NaN included: they never reach the loss,
its gradient or the metrics.

References: DeepSeekMath (GRPO: arXiv 2402.03300), DAPO (asymmetric clipping, token-level aggregation: arXiv
2503.14476), Dr. GRPO (no division by the group std: arXiv 2503.20783), Schulman's k3 KL estimator
(http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import torch

from zili.models.loss import CPU_BLOCK_ELEMENTS, DEVICE_BLOCK_ELEMENTS

AGGREGATIONS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages (n_prompts * G,) of rewards (n_prompts * G,) laid out prompt-major (the G completions of one
    prompt are adjacent): A = (r - mean of its group) / (std of its group + eps), or r - mean of its group with
    `scale_by_std=False` (Dr. GRPO: no division by the std, which would weight nearly-solved and
    nearly-hopeless prompts up). Returned in fp32 (fp64 stays fp64), in the units of reward / reward std.

    The std is the sample std (Bessel's correction, divisor G - 1), as in DeepSeekMath's reference
    implementation and TRL, so advantages (and the clip ε and KL β tuned against them) carry over from those
    systems: rewards {0, 1} in a group of 2 give ±0.7071, not ±1. A group whose rewards are all equal — G = 1
    included, where the sample std is undefined — gets exactly zero advantage (no NaN): it carries no signal
    about which completion is better.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (n_prompts * G,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True, correction=1) + eps)
    # mean() of equal floats need not round back to the same float: force exact zeros, and G = 1 is such a group
    flat = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centred), centred).view(-1)


def _clip_range(clip_eps: float | tuple[float, float]) -> tuple[float, float]:
    low, high = (clip_eps, clip_eps) if isinstance(clip_eps, int | float) else clip_eps
    if not (0 <= low < 1 and high >= 0):
        raise ValueError(f"clip_eps must be ε ≥ 0 or (ε_low, ε_high) with 0 ≤ ε_low < 1, ε_high ≥ 0; got {clip_eps}")
    return float(low), float(high)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float | tuple[float, float] = 0.2, kl_beta: float = 0.0,
              ref_logprobs: torch.Tensor | None = None, aggregation: str = "token",
              denominator: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO policy loss (0-dim fp32 tensor, differentiable in `logprobs`) and detached metrics.

    logprobs (B, T): log-probabilities of the sampled tokens under the policy being trained (with grad).
    old_logprobs (B, T): the same under the policy that sampled them (no grad; equal to `logprobs` on the first
        update of a batch of rollouts, where the ratio is 1).
    advantages (B,) per sequence (from `group_advantages`) or (B, T) per token.
    mask (B, T): the completion tokens that count.
    clip_eps: ε for the ratio's clip range [1 - ε, 1 + ε], or (ε_low, ε_high) for [1 - ε_low, 1 + ε_high]
        (DAPO's clip-higher).
    kl_beta, ref_logprobs (B, T): adds β · k3 per token, k3 = exp(ref - logp) - (ref - logp) - 1, an unbiased
        estimate of KL(policy || reference) that is never negative. `ref_logprobs` is required when β > 0; given
        with β = 0 the KL is only measured.

    Per token: ratio = exp(logp - old), loss_t = -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A) + β · k3.
    `aggregation`:
      "token" — sum of loss_t over every counted token of the batch / the number of counted tokens (DAPO's
        token-level loss: every token weighs the same, so long completions are not diluted);
      "sequence" — mean of loss_t over each sequence's counted tokens, then the mean over the sequences that
        have any (the original GRPO).
    `denominator` replaces that divisor (the token count, resp. the sequence count): pass the count over all
    micro-batches and ranks so that gradient accumulation and data parallelism give the loss of the whole
    batch (sum the per-micro-batch losses; do not average them again).

    Metrics (floats, over counted tokens): `clip_fraction` — share of tokens where the clipped term is the
    active one (ratio > 1 + ε_high with A > 0, or ratio < 1 - ε_low with A < 0: the tokens whose gradient the
    clip cuts to zero); `ratio_mean`; `kl` — mean k3, present only when `ref_logprobs` is given.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_beta and ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs, the frozen reference policy's log-probabilities")
    shapes = {"logprobs": logprobs, "old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        shapes["ref_logprobs"] = ref_logprobs
    if advantages.dim() == 2:
        shapes["advantages"] = advantages
    if logprobs.dim() != 2 or any(t.shape != logprobs.shape for t in shapes.values()):
        got = ", ".join(f"{k} {tuple(t.shape)}" for k, t in shapes.items())
        raise ValueError(f"expected (B, T) tensors of one shape, got {got}")
    if advantages.dim() == 1 and advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (B,) or (B, T) for logprobs "
                         f"{tuple(logprobs.shape)}")
    low, high = _clip_range(clip_eps)

    mask = mask.bool()
    logp = logprobs.float()
    zero = logp.new_zeros(())
    adv = advantages.float()
    adv = torch.where(mask, adv[:, None] if adv.dim() == 1 else adv, zero)
    # Mask before exp(): a masked -inf or NaN would otherwise give inf/NaN, and 0 * inf is NaN in the gradient.
    log_ratio = torch.where(mask, logp - old_logprobs.float(), zero)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv  # clamp's gradient is zero outside the range
    per_token = -torch.minimum(unclipped, clipped)
    k3 = None
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.float() - logp, zero)
        # expm1(d) - d: exact cancellation never goes below zero, where exp(d) - d - 1 can for tiny d
        k3 = torch.expm1(d) - d
        if kl_beta:
            per_token = per_token + kl_beta * k3
    per_token = torch.where(mask, per_token, zero)

    if aggregation == "token":
        count = mask.sum().clamp(min=1) if denominator is None else denominator
        loss = per_token.sum() / count
    else:
        lengths = mask.sum(dim=1)
        per_seq = per_token.sum(dim=1) / lengths.clamp(min=1)
        count = (lengths > 0).sum().clamp(min=1) if denominator is None else denominator
        loss = per_seq.sum() / count

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        cut = ((ratio > 1.0 + high) & (adv > 0)) | ((ratio < 1.0 - low) & (adv < 0))
        figures = [(cut & mask).sum() / n, torch.where(mask, ratio, zero).sum() / n]
        if k3 is not None:
            figures.append(torch.where(mask, k3, zero).sum() / n)
        values = torch.stack(figures).tolist()  # one host sync for all of them
    metrics = {"clip_fraction": values[0], "ratio_mean": values[1]}
    if k3 is not None:
        metrics["kl"] = values[2]
    return loss, metrics


def _block_rows(logits: torch.Tensor) -> int:
    """Rows of (., V) fp32 temporaries per block: the budget of zili.models.loss (cache-sized on CPU)."""
    budget = CPU_BLOCK_ELEMENTS if logits.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(1, budget // logits.shape[-1])


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (B, T) fp32 of `tokens` (B, T) under `logits` (B, T, V) of any float dtype: position t's
    distribution scored at tokens[:, t] — pass the next tokens, i.e. the input shifted by one. Every id must lie
    in [0, V) (pad with any valid id and mask those positions out). Stable: logit[token] - logsumexp(logits),
    a block of rows at a time in fp32, so no fp32 copy of the whole (B, T, V) logits is made outside autograd
    (under autograd each block's input is kept for the backward). Differentiable in `logits`.

    `temperature` (> 0) scores under softmax(logits / temperature), the distribution that sampling at that
    temperature draws from — the policy whose ratio and gradient GRPO needs (as TRL and verl do)."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and tokens (B, T), got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    temperature = _check_temperature(temperature)
    flat = logits.reshape(-1, logits.shape[-1])
    ids = tokens.reshape(-1, 1).long()
    rows = _block_rows(logits)
    parts = []
    for i in range(0, flat.shape[0], rows):
        block = flat[i : i + rows].float()
        if temperature != 1.0:
            block = block / temperature
        parts.append(block.gather(1, ids[i : i + rows]).squeeze(1) - torch.logsumexp(block, dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.view(tokens.shape)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean entropy (0-dim fp32 tensor, nats) of the next-token distributions of `logits` (B, T, V) over the
    positions where `mask` (B, T) is True: H = -Σ_v p_v log p_v with log p = log_softmax, which is stable for
    any logits. Only counted rows are read, a block at a time, so the fp32 temporaries stay a block in size —
    far below one extra (B, T, V) tensor. 0 when no position counts. Differentiable; call it under
    torch.no_grad() for a metric. `temperature` (> 0): the entropy of softmax(logits / temperature), the
    distribution sampled at that temperature."""
    if logits.dim() != 3 or mask.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and mask (B, T), got {tuple(logits.shape)} and "
                         f"{tuple(mask.shape)}")
    temperature = _check_temperature(temperature)
    flat = logits.reshape(-1, logits.shape[-1])
    kept = mask.reshape(-1).bool().nonzero().squeeze(1)  # one host sync, for the row count
    rows = _block_rows(logits)
    floor = torch.finfo(torch.float32).min  # a -inf logit (a banned token) has p = 0: 0 * floor is 0, not NaN
    total = flat.new_zeros((), dtype=torch.float32)
    for i in range(0, kept.numel(), rows):
        logp = torch.log_softmax(flat.index_select(0, kept[i : i + rows]).float() / temperature,
                                 dim=-1).clamp(min=floor)
        total = total - (logp.exp() * logp).sum()
    return total / max(1, kept.numel())
