"""One optimizer step: forward/backward over micro-batches (gradient accumulation), clip, update.

Used by the trainer and by the throughput benchmarks, so that both measure the same work.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


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
    if isinstance(logits, DTensor):  # vocabulary-sharded logits (tensor parallel): call under loss_parallel()
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
    flat = logits.flatten(0, 1)
    # fp32 elements per block: ~1 MB on CPU, where a block then stays in cache; ~1 GB elsewhere (few
    # launches, and still no fp32 copy of the whole logits)
    budget = 1 << 18 if flat.device.type == "cpu" else 1 << 28
    rows = max(1, budget // flat.shape[-1])
    return _CrossEntropy.apply(flat, targets.flatten(), ignore_index, rows)


def detached_value(loss: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor (the full value of a DTensor loss under loss parallelism)."""
    loss = loss.detach()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def forward_backward(model, inputs: torch.Tensor, targets: torch.Tensor, *, micro_batch: int,
                     autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over `inputs` (B, T) in chunks of `micro_batch` sequences;
    return the mean loss (0-dim tensor on the device; no host sync)."""
    n_micro = inputs.shape[0] // micro_batch
    total = torch.zeros((), device=inputs.device)
    sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2: reduce gradients once, after the last
    for i in range(n_micro):
        if sync is not None:
            sync(i == n_micro - 1)
        chunk = slice(i * micro_batch, (i + 1) * micro_batch)
        with autocast():
            logits = model(inputs[chunk])
        loss = lm_loss(logits, targets[chunk]) / n_micro
        loss.backward()
        total += detached_value(loss)
    return total


def pipeline_forward_backward(schedule, inputs: torch.Tensor, targets: torch.Tensor, *, first: bool, last: bool,
                              autocast: Callable[[], ContextManager], train: bool = True) -> torch.Tensor:
    """Run one pipeline step over the local batch (forward and backward, or forward only if not `train`).
    Returns the mean loss on a rank holding the last stage, 0 elsewhere."""
    losses: list[torch.Tensor] = []
    args = (inputs,) if first else ()
    target = targets if last else None
    with autocast():
        if train:
            schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            schedule.eval(*args, target=target, losses=losses)
    if not last:
        return torch.zeros((), device=inputs.device)
    return torch.stack([detached_value(loss) for loss in losses]).mean()


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of `parameters` — across every shard (DTensor) and, with `pp_group`,
    every pipeline stage — and scale them to at most `max_norm` (0 = measure only). Returns the norm."""
    # plain tensors and DTensors on different meshes can't share one foreach kernel: one group each
    groups: dict[int, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(id(mesh), []).append(p)
    squared = None
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = norm.float().square() if squared is None else squared + norm.float().square()
    if squared is None:
        raise ValueError("no parameter has a gradient")
    if pp_group is not None:
        torch.distributed.all_reduce(squared, group=pp_group)
    total = squared.sqrt()
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def train_step(model, optimizer, inputs: torch.Tensor, targets: torch.Tensor, *, micro_batch: int,
               autocast: Callable[[], ContextManager], grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of a single (unpipelined) model: accumulate gradients over `inputs` (B, T) in
    chunks of `micro_batch` sequences, clip the global norm to `grad_clip` (0 = off), step and zero the
    gradients. Returns (mean loss, grad norm) as 0-dim tensors, still on the device (no host sync)."""
    total = forward_backward(model, inputs, targets, micro_batch=micro_batch, autocast=autocast)
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm
