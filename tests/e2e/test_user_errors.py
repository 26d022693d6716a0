"""Bad input through the CLI: one line on stderr, exit code 2, no traceback."""

import pytest

from tests.conftest import TINY_MODEL


def assert_user_error(proc, fragment):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["train", "--config", "missing.toml"], "missing.toml"),
    (["train", "--training.stepz=3"], "training.stepz"),
    (["train", "--optimizer.lr=-0.1"], "optimizer.lr must be positive"),
    (["train", "--model.n_heads=4", "--model.n_kv_heads=3"], "n_kv_heads"),
    (["train", "--data.dataset=no/such/dir"], "no/such/dir"),
    (["generate", "no/such/run", "--prompt", "hi"], "no/such/run"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_gives_one_line_and_exit_2(zili_cli, args, fragment):
    assert_user_error(zili_cli(*args), fragment)


def test_generate_without_checkpoint(zili_cli, tmp_path):
    (tmp_path / "empty-run").mkdir()
    assert_user_error(zili_cli("generate", tmp_path / "empty-run", "--prompt", "hi"), "no complete checkpoint")


def test_empty_corpus(zili_cli, tiny_dataset, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = zili_cli("data", "prepare", "--input", tmp_path / "empty.txt", "--tokenizer", tiny_dataset / "tokenizer",
                    "--output", tmp_path / "out")
    assert_user_error(proc, "empty")
    assert not (tmp_path / "out").exists()


def test_incompatible_checkpoint_on_resume(zili_cli, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    zili_cli("train", *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=2",
             f"--training.run_dir={run}", check=True)
    proc = zili_cli("train", *TINY_MODEL, "--model.dim=128", f"--data.dataset={tiny_dataset}",
                    "--training.steps=4", f"--training.run_dir={run}", "--checkpoint.resume=auto")
    assert_user_error(proc, "another model: dim=64 (now 128)")
