"""DCP checkpoints: exact round trip, atomic directories, retention, one-line errors on mismatch."""

import pytest
import torch

from zili import checkpoint
from zili.config import OptimizerConfig
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.train.optim import build_optimizer

ARGS = dict(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=50, max_seq_len=16)


def trained(seed, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**ARGS, **kw}))
    model.init_weights(seed)
    opt = build_optimizer(model, OptimizerConfig(), "cpu")
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_trainer_state(tmp_path):
    model, opt = trained(0)
    state = {"step": torch.tensor(7), "rng_cpu": torch.get_rng_state()}
    checkpoint.save(tmp_path, 7, [model], [opt], state, {"model": model.args.to_dict()}, keep=2)
    other, other_opt = trained(1)
    loaded = checkpoint.load(checkpoint.resolve(tmp_path), [other], [other_opt],
                             {"step": torch.tensor(0), "rng_cpu": torch.zeros_like(state["rng_cpu"])})
    assert int(loaded["step"]) == 7 and torch.equal(loaded["rng_cpu"], state["rng_cpu"])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], other_opt.state[b]["exp_avg_sq"])


def test_retention_keeps_newest_and_leaves_no_temporaries(tmp_path):
    model, opt = trained(0)
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, [model], [opt], {"step": torch.tensor(step)}, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000003", "step-0000004"]
    assert checkpoint.resolve(tmp_path).name == "step-0000004"
    assert checkpoint.resolve(tmp_path, 3).name == "step-0000003"


def test_incomplete_checkpoint_is_ignored(tmp_path):
    model, opt = trained(0)
    checkpoint.save(tmp_path, 1, [model], [opt], {"step": torch.tensor(1)}, {}, keep=3)
    (tmp_path / "checkpoints" / ".tmp-step-0000002").mkdir()  # a save that died half-way
    (tmp_path / "checkpoints" / "step-0000003").mkdir()  # no metadata: not complete
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-0000001"]


def test_mismatched_model_is_a_user_error(tmp_path):
    model, opt = trained(0)
    checkpoint.save(tmp_path, 1, [model], [opt], {"step": torch.tensor(1)}, {"model": model.args.to_dict()}, keep=1)
    path = checkpoint.resolve(tmp_path)
    wider, wider_opt = trained(0, dim=64)
    with pytest.raises(UserError, match="another model: dim=32"):
        checkpoint.check_compatible(path, wider.args.to_dict())
    with pytest.raises(UserError, match="has shape"):
        checkpoint.load_model(path, wider)
    with pytest.raises(UserError, match="no checkpoint for step 5"):
        checkpoint.resolve(tmp_path, 5)


def test_load_errors_name_the_real_cause(tmp_path):
    model, opt = trained(0)
    checkpoint.save(tmp_path, 1, [model], [opt], {"step": torch.tensor(1)}, {"model": model.args.to_dict()}, keep=1)
    path = checkpoint.resolve(tmp_path)
    wider, _ = trained(0, dim=64)
    with pytest.raises(UserError, match=r"'model.embed.weight' has shape \(50, 32\) there but \(50, 64\) here"):
        checkpoint.load_model(path, wider)
    tied, tied_opt = trained(0, tied_embeddings=True)
    checkpoint.save(tmp_path / "tied", 1, [tied], [tied_opt], {}, {}, keep=1)
    with pytest.raises(UserError, match="has no 'model.lm_head.weight'"):
        checkpoint.load_model(checkpoint.resolve(tmp_path / "tied"), model)
    for data in path.glob("*.distcp"):
        data.unlink()
    with pytest.raises(UserError, match="data file is missing or unreadable .*No such file"):
        checkpoint.load_model(path, model)
    (path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot be read .* damaged"):
        checkpoint.load_model(path, model)
    (path / ".metadata").unlink()
    with pytest.raises(UserError, match="no .metadata file"):
        checkpoint.load_model(path, model)


def test_optional_trainer_state_missing_from_an_older_checkpoint_is_left_out(tmp_path):
    model, opt = trained(0)
    checkpoint.save(tmp_path, 3, [model], [opt], {"step": torch.tensor(3)}, {}, keep=1)
    expected = {"step": torch.tensor(0), "skipped_steps": torch.tensor(0.0)}
    loaded = checkpoint.load(checkpoint.resolve(tmp_path), [model], [opt], dict(expected), optional=("skipped_steps",))
    assert set(loaded) == {"step"} and int(loaded["step"]) == 3
    with pytest.raises(UserError, match="has no 'trainer.skipped_steps'"):
        checkpoint.load(checkpoint.resolve(tmp_path), [model], [opt], dict(expected))
