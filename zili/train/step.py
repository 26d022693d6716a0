"""One optimizer step: forward/backward over micro-batches (gradient accumulation), clip, update.

Used by the trainer and by the throughput benchmarks, so that both measure the same work.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (nats per token)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


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
