"""Checkpoints written in the background (zili.checkpoint.background): the state of the moment of the save, never
visible before it is complete, one save in flight, a failure raised on the next wait with the earlier checkpoints
intact."""

import concurrent.futures
import errno
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from zili import checkpoint
from zili.checkpoint import background
from zili.config import OptimizerConfig
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.train.optim import build_optimizer

ARGS = dict(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=40, max_seq_len=8)


@pytest.fixture
def model_and_optimizer():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(0)
    opt = build_optimizer(model, OptimizerConfig(), "cpu")
    model(torch.randint(0, 40, (2, 8))).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def gated(monkeypatch):
    """DCP's async save, its write held until `gate.set()` (or failing with `fail`): the staging is real."""
    gate, fail = threading.Event(), []
    real = dcp.async_save

    def async_save(state, checkpoint_id, process_group=None):
        staged = real(state, checkpoint_id=checkpoint_id + "-staged", process_group=process_group)  # copies now
        result = concurrent.futures.Future()

        def finish():
            gate.wait(30)
            staged.result()
            if fail:
                result.set_exception(fail[0])
                return
            loaded = {k: {n: torch.empty_like(t) if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                      for k, v in state.items()}
            dcp.load(loaded, checkpoint_id=checkpoint_id + "-staged")  # the staged values, written to the real path
            dcp.save(loaded, checkpoint_id=checkpoint_id)
            result.set_result(None)

        threading.Thread(target=finish, daemon=True).start()
        return result

    monkeypatch.setattr(background.dcp, "async_save", async_save)
    return gate, fail


def test_background_save_holds_the_state_of_its_step_and_appears_only_when_complete(
        tmp_path, model_and_optimizer, gated):
    model, opt = model_and_optimizer
    gate, _ = gated
    saver = background.BackgroundSaver()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver.save(tmp_path, 3, [model], [opt], {"step": torch.tensor(3)}, {"model": model.args.to_dict()}, keep=2)
    with torch.no_grad():  # training goes on while the save is in flight
        for p in model.parameters():
            p.add_(1.0)
    assert saver.in_flight
    assert checkpoint.list_checkpoints(tmp_path) == []  # not visible before complete
    assert (tmp_path / "checkpoints" / ".tmp-step-0000003").is_dir()
    gate.set()
    path = saver.wait()
    assert path.name == "step-0000003" and checkpoint.verify(path).usable
    other = Transformer(ModelArgs(**ARGS))
    checkpoint.load_model(path, other)
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_full_disk_in_the_background_is_raised_by_the_next_save_and_keeps_the_earlier_checkpoint(
        tmp_path, model_and_optimizer, gated):
    model, opt = model_and_optimizer
    gate, fail = gated
    gate.set()
    saver = background.BackgroundSaver()
    saver.save(tmp_path, 1, [model], [opt], {"step": torch.tensor(1)}, {}, keep=2)
    saver.wait()
    fail.append(OSError(errno.ENOSPC, "No space left on device"))
    saver.save(tmp_path, 2, [model], [opt], {"step": torch.tensor(2)}, {}, keep=2)
    with pytest.raises(UserError, match="no space left on device writing checkpoint step 2 .* step-0000001 is intact"):
        saver.save(tmp_path, 3, [model], [opt], {"step": torch.tensor(3)}, {}, keep=2)  # waits for step 2 first
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-0000001"]
    assert not (tmp_path / "checkpoints" / ".tmp-step-0000002").exists()


def test_a_non_finite_state_is_refused_before_anything_is_staged(tmp_path, model_and_optimizer, gated):
    model, opt = model_and_optimizer
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(UserError, match="not finite"):
        background.BackgroundSaver().save(tmp_path, 1, [model], [opt], {"step": torch.tensor(1)}, {}, keep=2)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
