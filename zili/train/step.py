"""The ONE train step, used by the trainer, `zili bench` and benchmarks/: forward and backward over this
rank's batch (gradient accumulation over micro-batches, or the pipeline schedule), the global gradient norm
and clipping, and the optimizer update — skipped when the step is not finite.

Non-finite steps. The loss and the gradient norm are checked together on the device (one fused check) and
agreed on by every rank; a non-finite step leaves weights and optimizer state as they were. Fused AdamW
(zili's default) skips on the device through the `found_inf` flag it shares with `torch.amp.GradScaler`, so
the fast path has no host sync; the foreach / for-loop implementations read the flag on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from zili.compat import fused_step_unless
from zili.data.packing import IGNORE
from zili.models.loss import cross_entropy
from zili.parallel.apply import ParallelModel


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE,
            reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (nats per token) of (B, T, V) logits, or with `reduction="sum"` the
    sum (nats); targets equal to `ignore_index` don't count. Vocabulary-sharded logits (tensor parallel) go
    through torch's loss-parallel cross-entropy (call under `ParallelModel.loss_context()`)."""
    if isinstance(logits, DTensor):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                               reduction=reduction)
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index, reduction)


def trained_token_scale(model: ParallelModel, targets: torch.Tensor) -> torch.Tensor:
    """What turns this rank's summed loss into its share of the mean over the trained targets of the global batch
    (0-dim device tensor): data ranks / trained targets of all of them. Gradients are averaged over the data
    ranks, so the mean gradient is that of the global token mean, however the trained tokens fall on ranks."""
    count = (targets != IGNORE).sum().float()
    ranks = 1
    if model.data_group is not None:
        dist.all_reduce(count, group=model.data_group)
        ranks = dist.get_world_size(model.data_group)
    return ranks / count.clamp(min=1)


def detached_value(loss: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor (the full value of a DTensor loss under loss parallelism)."""
    loss = loss.detach()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def _accumulate(model: ParallelModel, inputs, targets, micro_batch: int, autocast, train: bool,
                mtp_weight: float = 0.0, documents=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    part = model.parts[0]
    inputs, targets, positions = model.sequence_part(inputs, targets)  # context parallel: this rank's chunks
    where = {} if positions is None else {"positions": positions}
    n_micro = inputs.shape[0] // micro_batch
    # packed documents: the mean over the global batch's trained targets, whichever micro-batch holds them
    scale = trained_token_scale(model, targets) if documents is not None else None
    total = torch.zeros((), device=inputs.device)
    mtp_total = torch.zeros((), device=inputs.device) if mtp_weight else None
    sync = getattr(part, "set_requires_gradient_sync", None)  # FSDP2: reduce gradients once, after the last
    for i in range(n_micro):
        if sync is not None and train:
            sync(i == n_micro - 1)
        chunk = slice(i * micro_batch, (i + 1) * micro_batch)
        if documents is not None:
            where["documents"] = documents[chunk]
        with model.loss_context():
            with autocast():
                out = part(inputs[chunk], mtp=True, **where) if mtp_weight else part(inputs[chunk], **where)
            logits, mtp_logits = out if mtp_weight else (out, None)
            if scale is None:
                loss = lm_loss(logits, targets[chunk]) / n_micro
            else:
                loss = lm_loss(logits, targets[chunk], reduction="sum") * scale
            objective = loss
            aux = [layer.aux_loss for layer in expert_layers(part) if layer.aux_loss is not None] if train else []
            if aux:  # the experts' sequence-wise balance losses, weighted already
                objective = objective + torch.stack(aux).sum() / n_micro
            if mtp_logits is not None:  # position i predicts token i+2: the targets from position 1 on
                mtp_loss = lm_loss(mtp_logits, targets[chunk][:, 1:]) / n_micro
                objective = loss + mtp_weight * mtp_loss
                mtp_total += mtp_loss.detach()
            if train:
                objective.backward()
        total += detached_value(loss)
    return total, mtp_total


def _pipeline(model: ParallelModel, inputs, targets, autocast, train: bool) -> torch.Tensor:
    losses: list[torch.Tensor] = []
    args = (inputs,) if model.has_first_stage else ()
    target = targets if model.has_last_stage else None
    with model.loss_context(), autocast():
        if train:
            model.schedule.step(*args, target=target, losses=losses)
        else:
            model.schedule.eval(*args, target=target, losses=losses)
    if not model.has_last_stage:
        return torch.zeros((), device=inputs.device)
    return torch.stack([detached_value(loss) for loss in losses]).mean()


def forward_backward(model: ParallelModel, inputs: torch.Tensor, targets: torch.Tensor, *, micro_batch: int,
                     autocast: Callable[[], AbstractContextManager], train: bool = True,
                     mtp_weight: float = 0.0, documents: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(The mean language-modelling loss over this rank's batch `inputs` (B, T), the mean multi-token-prediction
    loss or None) — with gradients of loss + `mtp_weight` x mtp loss accumulated when `train` (mtp_weight > 0
    needs a model with `mtp_depth` 1) — as 0-dim device tensors (no host sync). Pipelined models: the loss on
    ranks holding the last stage, 0 elsewhere; otherwise `micro_batch` sequences per forward/backward. Under
    context parallelism every rank of a cp group is given the same sequences and keeps its own chunks of them
    (`ParallelModel.sequence_part`): the loss is then the mean over this rank's tokens. With `documents` (B, T)
    (packed conversations, zili.data.packing; not with pipeline or context parallelism) the model keeps the
    documents apart and the loss is the mean over the trained targets (not IGNORE) of the global batch: this
    rank's share of it, so that the data ranks' losses add up to it (their mean times the data ranks)."""
    if model.schedule is not None:
        if documents is not None:
            raise ValueError("packed documents cannot go through a pipeline schedule")
        return _pipeline(model, inputs, targets, autocast, train), None
    return _accumulate(model, inputs, targets, micro_batch, autocast, train, mtp_weight, documents)


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of `parameters` — across every shard (DTensor) and, with `pp_group`,
    every pipeline stage — and scale them to at most `max_norm` (0 = measure only). Returns the norm."""
    # plain tensors and DTensors on different meshes can't share one foreach kernel: one group per mesh
    # (DeviceMesh compares by value, so equal meshes held as different objects share a group)
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(mesh, []).append(p)
    squared = None
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = norm.float().square() if squared is None else squared + norm.float().square()
    if squared is None:
        raise ValueError("no parameter has a gradient")
    if pp_group is not None:
        dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt()
    if max_norm > 0:
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """1.0 if this step's loss or gradient norm is not finite on any rank, else 0.0 (device tensor)."""
    bad = (~torch.isfinite(loss.float() + grad_norm.float())).float()
    if dist.is_initialized() and dist.get_world_size() > 1:  # a rank's infinite loss can come with finite gradients
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()` unless `skip` (a 0-dim 0/1 device tensor) is set; then zero the gradients."""
    if optimizer.defaults.get("fused"):
        fused_step_unless(optimizer, skip)
    elif not bool(skip):  # host sync: only the unfused implementations pay it
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class StepResult:
    """0-dim device tensors (no host sync): the mean loss over this rank's batch (nats/token), the global
    gradient norm before clipping, and `skipped` = 1.0 when the update was skipped (non-finite step)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor
    expert_load: torch.Tensor | None = None  # max over expert layers of busiest expert's tokens ÷ mean; None: dense
    mtp_loss: torch.Tensor | None = None  # the multi-token-prediction loss (nats/token); None without it
    tokens: int | None = None  # tokens processed by all ranks, when not batch x seq_len (reinforcement learning)
    metrics: dict[str, float] | None = None  # more figures for the step's metrics record (reinforcement learning)


def expert_layers(part) -> list:
    """The mixture-of-experts feed-forwards of one model part (none for other modules)."""
    return part.expert_layers() if hasattr(part, "expert_layers") else []


def balance_experts(model: ParallelModel, rate: float, skipped: torch.Tensor) -> torch.Tensor | None:
    """After an optimizer step: the step's expert load (max over this rank's expert layers of busiest ÷ mean over
    the global batch, 0-dim device tensor; None for a dense model), then each sigmoid-routed layer's
    balancing-bias update by `rate` — none when the step was skipped — and the load counts restarted."""
    layers = [layer for part in model.parts for layer in expert_layers(part)]
    if not layers:
        return None
    if model.data_group is not None:  # every rank balances on the global batch's load, as one process would
        counts = torch.stack([layer.tokens_per_expert for layer in layers])
        dist.all_reduce(counts, group=model.data_group)
        for layer, count in zip(layers, counts):
            layer.tokens_per_expert.copy_(count)
    load = torch.stack([layer.load_imbalance() for layer in layers]).max()
    for layer in layers:
        layer.update_bias(rate * (1 - skipped))
    return load


def train_step(model: ParallelModel, optimizers: list[torch.optim.Optimizer], inputs: torch.Tensor,
               targets: torch.Tensor, *, micro_batch: int, autocast: Callable[[], AbstractContextManager],
               grad_clip: float, bias_update_rate: float = 0.0, mtp_weight: float = 0.0,
               documents: torch.Tensor | None = None) -> StepResult:
    """One optimizer step on this rank's batch `inputs`/`targets` (B, T): forward/backward (see
    `forward_backward`), global-norm clipping to `grad_clip` (0 = off), then each part's optimizer steps —
    unless the loss or the gradient norm is not finite anywhere, in which case no parameter changes."""
    loss, mtp_loss = forward_backward(model, inputs, targets, micro_batch=micro_batch, autocast=autocast,
                                      mtp_weight=mtp_weight, documents=documents)
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip, model.pp_group)
    skipped = nonfinite(loss, grad_norm)
    for optimizer in optimizers:
        optimizer_step(optimizer, skipped)
    return StepResult(loss, grad_norm, skipped, balance_experts(model, bias_update_rate, skipped), mtp_loss)
