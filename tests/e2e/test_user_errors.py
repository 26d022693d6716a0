"""Bad input through the CLI: one line on stderr, exit code 2, no traceback. A few go through `python -m zili`
in a subprocess as a user would; the others call the same `zili.cli.main` in this process (seconds faster each
on 2 cores): the exit code, stderr and the absence of a traceback are checked alike."""

import subprocess

import pytest

from tests.conftest import TINY_MODEL
from zili.cli import main


def assert_user_error(proc, fragment):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]


@pytest.fixture
def zili_in_process(tmp_path, monkeypatch, capsys):
    """`zili ARGS` through zili.cli.main in this process, in `tmp_path`: a CompletedProcess like zili_cli's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZILI_CACHE", str(tmp_path / "cache"))

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["zili", *args], code, out.out, out.err)

    return run


@pytest.mark.parametrize("args, fragment", [
    (["train", "--training.stepz=3"], "training.stepz"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_gives_one_line_and_exit_2(zili_cli, args, fragment):
    assert_user_error(zili_cli(*args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["train", "--config", "missing.toml"], "missing.toml"),
    (["train", "--optimizer.lr=-0.1"], "optimizer.lr must be positive"),
    (["train", "--model.n_heads=4", "--model.n_kv_heads=3"], "n_kv_heads"),
    (["train", "--data.dataset=no/such/dir"], "no/such/dir"),
    (["generate", "no/such/run", "--prompt", "hi"], "no/such/run"),
])
def test_bad_input_gives_one_line_and_exit_2_in_process(zili_in_process, args, fragment):
    assert_user_error(zili_in_process(*args), fragment)


def test_generate_without_checkpoint(zili_in_process, tmp_path):
    (tmp_path / "empty-run").mkdir()
    assert_user_error(zili_in_process("generate", tmp_path / "empty-run", "--prompt", "hi"), "no complete checkpoint")


def test_empty_corpus(zili_in_process, tiny_dataset, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = zili_in_process("data", "prepare", "--input", tmp_path / "empty.txt", "--tokenizer",
                           tiny_dataset / "tokenizer", "--output", tmp_path / "out")
    assert_user_error(proc, "empty")
    assert not (tmp_path / "out").exists()


def test_incompatible_checkpoint_on_resume(zili_in_process, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    trained = zili_in_process("train", *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=2",
                              f"--training.run_dir={run}")
    assert trained.returncode == 0, trained.stderr
    proc = zili_in_process("train", *TINY_MODEL, "--model.dim=128", f"--data.dataset={tiny_dataset}",
                    "--training.steps=4", f"--training.run_dir={run}", "--checkpoint.resume=auto")
    assert_user_error(proc, "another model: dim=64 (now 128)")
