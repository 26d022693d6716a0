"""The torch version shims (`zili.compat`, the floor check in `zili/__init__`). The suite runs on one torch at a
time (`make test-compat TORCH=...` for the others), so the branches for the other releases are driven here with
stand-in schedule classes shaped like torch 2.8's and 2.13's."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import zili
from zili import compat

REPO = Path(__file__).resolve().parents[2]
MICRO = 4


def loss_fn(output, target):
    return (output - target).abs().mean()


class OldSchedule:
    """torch 2.8's interface: `scale_grads`, no `eval`, no `return_outputs`; a step leaves gradients behind."""

    built: list = []

    def __init__(self, stages, n_microbatches, loss_fn=None, scale_grads=True):
        self.stages, self.loss_fn, self.scale_grads, self.calls = stages, loss_fn, scale_grads, []
        OldSchedule.built.append(self)

    def step(self, *args, target=None, losses=None):
        self.calls.append(("step", torch.is_grad_enabled()))
        output = args[0] * 2
        for p in PART.parameters():
            p.grad = torch.ones_like(p)
        if losses is not None:
            losses[:] = [self.loss_fn(chunk, t) for chunk, t in zip(output.chunk(MICRO), target.chunk(MICRO))]


class NewSchedule(OldSchedule):
    """torch 2.13's interface: also `eval` and `return_outputs`."""

    def step(self, *args, target=None, losses=None, return_outputs=True):
        super().step(*args, target=target, losses=losses)
        self.calls[-1] = ("step", return_outputs)

    def eval(self, *args, target=None, losses=None, return_outputs=True):
        self.calls.append(("eval", return_outputs))
        output = args[0] * 2
        losses[:] = [self.loss_fn(chunk, t) for chunk, t in zip(output.chunk(MICRO), target.chunk(MICRO))]


PART = torch.nn.Linear(3, 3)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)


def _stages_factory():
    made = []

    def make():
        made.append(object())
        return [made[-1]]

    return make, made


def _micro_losses(inputs, targets):
    return torch.stack([loss_fn(o, t) for o, t in zip((inputs * 2).chunk(MICRO), targets.chunk(MICRO))])


def test_torch_2_8_evaluates_with_a_discarded_training_step(batch):
    inputs, targets = batch
    OldSchedule.built.clear()
    make, made = _stages_factory()
    schedule = compat.PipelineSchedule(OldSchedule, make, [PART], MICRO, loss_fn)
    train = OldSchedule.built[0]
    assert train.scale_grads and train.loss_fn is loss_fn
    PART.zero_grad(set_to_none=True)
    losses = []
    with torch.no_grad():  # as `zili.train.step.forward_backward(train=False)` calls it
        schedule.eval(inputs, target=targets, losses=losses)
    assert train.calls == [("step", True)]  # gradients enabled for the step's backward ...
    assert all(p.grad is None for p in PART.parameters())  # ... and its gradients dropped
    assert torch.allclose(torch.stack(losses), _micro_losses(inputs, targets))
    assert len(made) == 1  # no second set of stages
    schedule.step(inputs, target=targets, losses=losses)
    assert all(p.grad is not None for p in PART.parameters())


def test_new_torch_drops_outputs_and_evaluates_on_stages_of_its_own(batch):
    inputs, targets = batch
    OldSchedule.built.clear()
    make, made = _stages_factory()
    schedule = compat.PipelineSchedule(NewSchedule, make, [PART], MICRO, loss_fn)
    train = OldSchedule.built[0]
    losses = []
    schedule.step(inputs, target=targets, losses=losses)
    assert train.calls == [("step", False)]
    assert torch.allclose(torch.stack(losses), _micro_losses(inputs, targets))
    schedule.eval(inputs, target=targets, losses=losses)
    schedule.eval(inputs, target=targets, losses=losses)
    evaluator = OldSchedule.built[1]
    assert len(made) == 2 and len(OldSchedule.built) == 2  # built once, at the first eval
    assert evaluator.calls == [("eval", False), ("eval", False)] and train.calls == [("step", False)]


def test_sharding_cache_clears_on_this_torch():
    compat.clear_sharding_cache()  # the private function moved in torch 2.11: whichever exists is found


@pytest.mark.parametrize("version,release", [("2.6.0+cu124", (2, 6)), ("2.9.0a0+git1a2b", (2, 9)),
                                             ("2.13.0", (2, 13)), ("10.1", (10, 1))])
def testtorch_release_parsing(version, release):
    assert zili.torch_release(version) == release


def test_declared_floor_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in deps if d.startswith("torch")).split(">=")[1].split(",")[0]
    assert tuple(int(x) for x in floor.split(".")) == zili.TORCH_FLOOR


def test_older_torch_is_refused_in_one_line():
    code = "import torch; torch.__version__ = '2.7.1+cu126'; import zili"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "torch >= 2.8" in proc.stderr and "2.7.1" in proc.stderr
