"""Language-model losses on plain tensors: mean next-token cross-entropy in fp32 without an fp32 copy of the
logits.

`cross_entropy(logits (N, V), targets (N,))` equals `F.cross_entropy(logits.float(), targets)` (nats per
counted token; targets equal to `ignore_index` do not count) but works a block of rows at a time: the fp32
log-sum-exp and softmax of one block exist at a time, and the gradient is written straight in the logits'
dtype. The (tokens x vocabulary) fp32 copy that `logits.float()` would make — 4 bytes per logit, the largest
activation of small models with large vocabularies — is never allocated.
"""

from __future__ import annotations

import torch

# fp32 elements per block: ~1 MB on CPU, where a block then stays in cache; ~1 GB elsewhere (few kernel
# launches, and still no fp32 copy of the whole logits)
CPU_BLOCK_ELEMENTS = 1 << 18
DEVICE_BLOCK_ELEMENTS = 1 << 28


class _BlockwiseCrossEntropy(torch.autograd.Function):
    """loss = logsumexp(x) - x[target]; grad = softmax(x) - onehot, both a block of `rows` rows at a time."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, rows: int, mean: bool):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        for i in range(0, logits.shape[0], rows):
            lse[i : i + rows] = torch.logsumexp(logits[i : i + rows].float(), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        count = valid.sum() if mean else torch.ones((), device=logits.device, dtype=torch.int64)
        loss = torch.where(valid, lse - picked, 0.0).sum() / count
        ctx.save_for_backward(logits, safe, valid, lse, count)
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse, count = ctx.saved_tensors
        weight = valid.float() * (grad_loss / count)  # d loss / d (per-row loss)
        grad = torch.empty_like(logits)
        rows = ctx.rows
        for i in range(0, logits.shape[0], rows):
            probs = torch.exp(logits[i : i + rows].float() - lse[i : i + rows, None])
            probs.scatter_add_(1, safe[i : i + rows, None], torch.full_like(probs[:, :1], -1.0))
            grad[i : i + rows] = probs.mul_(weight[i : i + rows, None])
        return grad, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (N, V) logits against (N,) targets in fp32 (0-dim tensor): the mean over the counted
    targets (nats per token; NaN when none counts), or with `reduction="sum"` their sum (nats; 0 when none)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    budget = CPU_BLOCK_ELEMENTS if logits.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    rows = max(1, budget // logits.shape[-1])
    return _BlockwiseCrossEntropy.apply(logits, targets, ignore_index, rows, reduction == "mean")
