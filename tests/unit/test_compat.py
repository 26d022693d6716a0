"""The torch version shims (`zili.compat`, the floor check in `zili/__init__`). The suite runs on one torch at a
time (`make test-compat TORCH=...` for the others), so the branches for the other releases are driven here with
stand-in schedule classes shaped like torch 2.9's and 2.13's."""

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


class Schedule29:
    """torch 2.9's interface: `scale_grads`, `eval`, no `return_outputs`."""

    built: list = []

    def __init__(self, stages, n_microbatches, loss_fn=None, scale_grads=True):
        self.stages, self.loss_fn, self.scale_grads, self.calls = stages, loss_fn, scale_grads, []
        Schedule29.built.append(self)

    def _losses(self, inputs, target, losses):
        losses[:] = [self.loss_fn(o, t) for o, t in zip((inputs * 2).chunk(MICRO), target.chunk(MICRO))]

    def step(self, *args, target=None, losses=None):
        self.calls.append("step")
        self._losses(args[0], target, losses)

    def eval(self, *args, target=None, losses=None):
        self.calls.append("eval")
        self._losses(args[0], target, losses)


class Schedule213(Schedule29):
    """torch 2.13's interface: also `return_outputs`."""

    def step(self, *args, target=None, losses=None, return_outputs=True):
        self.calls.append(("step", return_outputs))
        self._losses(args[0], target, losses)

    def eval(self, *args, target=None, losses=None, return_outputs=True):
        self.calls.append(("eval", return_outputs))
        self._losses(args[0], target, losses)


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


@pytest.mark.parametrize("cls,step_call,eval_call", [(Schedule29, "step", "eval"),
                                                     (Schedule213, ("step", False), ("eval", False))],
                         ids=["torch2.9", "torch2.13"])
def test_schedule_scales_drops_outputs_where_it_can_and_evaluates_on_stages_of_its_own(batch, cls, step_call,
                                                                                      eval_call):
    inputs, targets = batch
    Schedule29.built.clear()
    make, made = _stages_factory()
    schedule = compat.PipelineSchedule(cls, make, MICRO, loss_fn)
    train = Schedule29.built[0]
    assert train.scale_grads and train.loss_fn is loss_fn  # torch scales gradients to the mean micro-batch loss
    losses = []
    schedule.step(inputs, target=targets, losses=losses)
    assert train.calls == [step_call]
    assert torch.allclose(torch.stack(losses), _micro_losses(inputs, targets))
    schedule.eval(inputs, target=targets, losses=losses)
    schedule.eval(inputs, target=targets, losses=losses)
    evaluator = Schedule29.built[1]
    assert len(made) == 2 and len(Schedule29.built) == 2  # built once, at the first eval, on new stages
    assert evaluator.stages is not train.stages
    assert evaluator.calls == [eval_call, eval_call] and train.calls == [step_call]
    assert torch.allclose(torch.stack(losses), _micro_losses(inputs, targets))


@pytest.mark.parametrize("version,release", [("2.6.0+cu124", (2, 6)), ("2.9.0a0+git1a2b", (2, 9)),
                                             ("2.13.0", (2, 13)), ("10.1", (10, 1))])
def testtorch_release_parsing(version, release):
    assert zili.torch_release(version) == release


def test_declared_floor_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in deps if d.startswith("torch")).split(">=")[1].split(",")[0]
    assert tuple(int(x) for x in floor.split(".")) == zili.TORCH_FLOOR


def test_older_torch_is_refused_in_one_line():
    code = "import torch; torch.__version__ = '2.8.0+cu128'; import zili"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "torch >= 2.9" in proc.stderr and "2.8.0" in proc.stderr
