"""RMSNorm: x / rms(x) * weight over the last dimension, through `zili.kernels.rms_norm`."""

from __future__ import annotations

import torch
from torch import nn

from zili import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.rms_norm(x, self.weight, self.eps)
        # Under autocast every consumer is a matmul that would cast to the compute dtype anyway (q, k and
        # v each separately): cast once here instead.
        if torch.is_autocast_enabled(x.device.type):
            return out.to(torch.get_autocast_dtype(x.device.type))
        return out.to(x.dtype)
