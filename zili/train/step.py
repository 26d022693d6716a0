"""One optimizer step: forward/backward over micro-batches (gradient accumulation), clip, update.

Used by the trainer and by the throughput benchmarks, so that both measure the same work.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits against (N,) targets (ignoring `ignore_index`), computed in fp32
    whatever the logits' dtype, a block of rows at a time, so that no fp32 copy of the logits is ever made
    and the gradient is written straight in the logits' dtype. Same math as
    `F.cross_entropy(logits.float(), targets)`: loss = logsumexp(x) - x[target], grad = softmax(x) - onehot."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, rows: int):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        for i in range(0, logits.shape[0], rows):
            lse[i : i + rows] = torch.logsumexp(logits[i : i + rows].float(), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        count = valid.sum()
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
        return grad, None, None, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (nats per token); targets equal to `ignore_index` don't count.
    Equal to `F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())` but lighter on memory."""
    flat = logits.flatten(0, 1)
    # fp32 elements per block: ~1 MB on CPU, where a block then stays in cache; ~1 GB elsewhere (few
    # launches, and still no fp32 copy of the whole logits)
    budget = 1 << 18 if flat.device.type == "cpu" else 1 << 28
    rows = max(1, budget // flat.shape[-1])
    return _CrossEntropy.apply(flat, targets.flatten(), ignore_index, rows)


def train_step(model, optimizer, inputs: torch.Tensor, targets: torch.Tensor, *, micro_batch: int,
               autocast: Callable[[], ContextManager], grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients over `inputs` (B, T) in chunks of `micro_batch` sequences, clip the global norm
    to `grad_clip` (0 = off), step and zero the gradients. Returns (mean loss, grad norm) as 0-dim
    tensors, still on the device (no host sync here)."""
    n_micro = inputs.shape[0] // micro_batch
    total = torch.zeros((), device=inputs.device)
    for i in range(n_micro):
        chunk = slice(i * micro_batch, (i + 1) * micro_batch)
        with autocast():
            logits = model(inputs[chunk])
        loss = lm_loss(logits, targets[chunk]) / n_micro
        loss.backward()
        total += loss.detach()
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm
