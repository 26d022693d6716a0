"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules.

Schedules are pure functions of the step (no state to checkpoint beyond the step itself):
- cosine: linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step;
- wsd (warmup-stable-decay): warmup, constant lr, then a linear decay to lr * min_lr_ratio over the
  last `decay_fraction` of the steps;
- constant: warmup, then lr.
"""

from __future__ import annotations

import math

import torch

from zili.config import OptimizerConfig


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(total_steps * cfg.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return peak + (floor - peak) * progress
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW; weight decay on 2-D+ weights only. `implementation` picks fused, foreach or the plain loop
    ('auto' = fused where PyTorch has a fused kernel for the device, else foreach)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = cfg.implementation
    if kind == "auto":
        kind = "fused" if device_type in ("cuda", "cpu", "xpu", "mps", "npu") else "foreach"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **flags)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
