"""Learning-rate schedules and the AdamW parameter groups."""

import math

import pytest
import torch

from zili.config import OptimizerConfig
from zili.train.optim import build_optimizer, lr_at


def test_cosine_warms_up_then_decays_to_floor():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)
    mid = 10 + (99 - 10) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (mid - 10) / 89)))


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=5, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[5:80] == [1.0] * 75
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[-1] == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimizerConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, 10, cfg) for s in range(10)} == {0.5}


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "for-loop"])
def test_weight_decay_only_on_matrices(impl):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1, implementation=impl), "cpu")
    decay, no_decay = opt.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
