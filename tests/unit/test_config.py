"""Config: TOML + overrides, typed coercion, one-line errors naming the key."""

import pytest

from zili.config import Config, describe, load_config, parse_overrides
from zili.errors import UserError


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg.model.preset == "tiny" and cfg.data.dataset == "demo" and cfg.training.dtype == "bf16"


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nlr = 0.01\n[model]\nn_heads = 8\n')
    cfg = load_config(path, parse_overrides(["--training.steps=9", "--optimizer.schedule", "wsd",
                                             "--training.compile=true", "--model.n_kv_heads=2"]))
    assert cfg.training.steps == 9 and cfg.training.seq_len == 64 and cfg.optimizer.lr == 0.01
    assert cfg.optimizer.schedule == "wsd" and cfg.training.compile is True
    assert cfg.model.n_heads == 8 and cfg.model.n_kv_heads == 2


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, parse_overrides(["--training.run_dir=a \"quoted\" dir", "--optimizer.lr=2e-4",
                                             "--model.dim=192"]))
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("--training.stepz=3", "training.stepz"),
    ("--trainin.steps=3", "trainin.steps"),
    ("--training.steps=abc", "expected an integer"),
    ("--optimizer.lr=-1", "optimizer.lr must be positive"),
    ("--training.dtype=fp8", "choose one of bf16, fp32"),
    ("--training.compile=maybe", "expected true or false"),
    ("--training.batch_size=10", "multiple of training.micro_batch_size"),
])
def test_bad_values_name_the_key(override, fragment):
    extra = ["--training.micro_batch_size=4"] if "batch_size=10" in override else []
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_config(None, parse_overrides([override, *extra]))


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(UserError) as err:
        load_config(None, parse_overrides(["--training.stepz=3"]))
    assert "steps" in str(err.value) and "seq_len" in str(err.value)


def test_unknown_key_in_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optimizer]\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match="optimizer.learning_rate"):
        load_config(path)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("[training\nsteps=")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_toml_types_are_strict(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[training]\nsteps = "ten"\n')
    with pytest.raises(UserError, match="training.steps"):
        load_config(path)


def test_override_syntax_errors():
    with pytest.raises(UserError, match="overrides look like"):
        parse_overrides(["steps=3"])
    with pytest.raises(UserError, match="needs a value"):
        parse_overrides(["--training.steps"])


def test_describe_lists_every_key_with_default():
    text = describe()
    for key in ("--model.preset", "--model.n_heads", "--model.n_kv_heads", "--training.steps", "--training.seed",
                "--training.device", "--training.batch_size", "--training.seq_len", "--training.dtype",
                "--training.run_dir", "--optimizer.lr", "--metrics.log_every", "--checkpoint.every",
                "--checkpoint.keep", "--checkpoint.resume"):
        assert key in text
    assert '"tiny"' in text and "400" in text
    assert Config().training.steps == 400


def test_moe_demo_config_matches_the_dense_demo_compute():
    """configs/moe-demo.toml loads and validates, is DeepSeek-V3-shaped (MLA, grouped sigmoid routing, a shared
    expert, a dense first block) and trains the dense demo's data for at most the training FLOPs the dense demo has
    spent at its step-300 validation (the comparison docs/moe.md reports is at equal active compute)."""
    from pathlib import Path

    from zili.models.flops import flops_per_token
    from zili.models.presets import resolve

    configs = Path(__file__).resolve().parents[2] / "configs"
    dense, moe = load_config(configs / "demo.toml"), load_config(configs / "moe-demo.toml")
    assert dense == load_config()  # the dense demo file is the defaults
    a_dense, a_moe = resolve(dense.model, 2048), resolve(moe.model, 2048)
    assert a_moe.is_mla and a_moe.is_moe and a_moe.score_func == "sigmoid" and a_moe.topk_group < a_moe.n_group
    assert a_moe.n_shared_experts == 1 and a_moe.n_dense_layers == 1
    assert (moe.data, moe.training.batch_size, moe.training.seq_len, moe.training.dtype) == (
        dense.data, dense.training.batch_size, dense.training.seq_len, dense.training.dtype)
    assert dense.training.eval_every == 100  # the dense demo validates at step 300

    def flops(steps, cfg, args):
        return steps * cfg.training.batch_size * cfg.training.seq_len * flops_per_token(args, cfg.training.seq_len)

    assert 0.97 <= flops(moe.training.steps, moe, a_moe) / flops(300, dense, a_dense) <= 1.0
