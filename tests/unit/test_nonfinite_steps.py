"""A non-finite step never changes the model or reaches a checkpoint: the update is skipped and counted
(`skipped_steps` in metrics.jsonl), and `training.max_skipped_steps` consecutive ones stop the run with one
line, the last good checkpoint left intact."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_MODEL
from zili import checkpoint
from zili.config import load_config, parse_overrides
from zili.errors import UserError
from zili.train.metrics import read_metrics
from zili.train.trainer import Trainer

NAN_STEPS = {5, 8, 9, 10}  # one isolated bad step, then three in a row (the limit)


def trainer_with_nans(tiny_dataset, run_dir, implementation="auto") -> tuple[Trainer, dict]:
    cfg = load_config(None, parse_overrides([
        *TINY_MODEL, f"--data.dataset={tiny_dataset}", f"--training.run_dir={run_dir}", "--training.steps=12",
        "--metrics.log_every=1", "--training.eval_every=0", "--checkpoint.every=2", "--checkpoint.keep=2",
        "--training.max_skipped_steps=3", f"--optimizer.implementation={implementation}"]))
    trainer = Trainer(cfg)
    part = trainer.model.parts[0]
    forward = part.forward

    def poisoned(tokens, *args, **kwargs):  # NaN logits at the chosen steps (counted from 1)
        out = forward(tokens, *args, **kwargs)
        return out * float("nan") if trainer.step + 1 in NAN_STEPS else out

    part.forward = poisoned
    after: dict[int, dict] = {}  # step -> parameters and optimizer moments after it
    train_step = trainer.train_step

    def recording(inputs, targets):
        result = train_step(inputs, targets)
        opt = trainer.optimizers[0]
        after[trainer.step + 1] = {name: (p.detach().clone(), opt.state[p]["exp_avg"].clone())
                                   for name, p in part.named_parameters()}
        return result

    trainer.train_step = recording
    return trainer, after


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_nan_steps_are_skipped_counted_and_stop_the_run(tiny_dataset, tmp_path, implementation):
    run_dir = tmp_path / "run"
    trainer, after = trainer_with_nans(tiny_dataset, run_dir, implementation)
    with pytest.raises(UserError, match="3 consecutive steps up to step 10 .* last good checkpoint is .*step-0000008"):
        trainer.run()
    for step in (5, 8, 9, 10):  # a skipped step changes neither the weights nor the optimizer state
        for name, (param, moment) in after[step].items():
            assert torch.equal(param, after[step - 1][name][0]), (step, name)
            assert torch.equal(moment, after[step - 1][name][1]), (step, name)
    assert any(not torch.equal(p, after[6][n][0]) for n, (p, _) in after[7].items())  # good steps do train
    records = {r["step"]: r for r in read_metrics(run_dir)}
    assert [records[s]["skipped_steps"] for s in range(1, 11)] == [0, 0, 0, 0, 1, 1, 1, 2, 3, 4]
    assert records[5]["loss"] is None and records[6]["loss"] > 0  # NaN is logged as null
    assert max(records) == 10  # stopped at the limit
    # nothing written after the limit; the kept checkpoints are finite and hold the last good weights
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-0000006", "step-0000008"]
    newest = checkpoint.resolve(run_dir)
    for name, (param, _) in after[7].items():
        saved = checkpoint.read_model_tensor(newest, name, param.shape)
        assert torch.isfinite(saved).all() and torch.equal(saved, param), name


def test_a_non_finite_state_is_never_saved(tiny_dataset, tmp_path):
    trainer, _ = trainer_with_nans(tiny_dataset, tmp_path / "run")
    trainer.prepare_run_dir()
    with torch.no_grad():
        next(trainer.model.parts[0].parameters())[0, 0] = float("inf")
    with pytest.raises(UserError, match="embed.weight is not finite"):
        trainer.save()
    assert checkpoint.list_checkpoints(tmp_path / "run") == []
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
