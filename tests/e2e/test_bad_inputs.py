"""Bad input, exhaustively: each command given what a new user gets wrong. Every row must end with exit code 2
and exactly one line on stderr, `error: ...`, that says what is wrong (the fragment asserted) — no traceback
anywhere — and must leave nothing behind: no new file or directory (no temporary one either) where the command
would have written, nor in any directory it read.

Most rows call `zili.cli.main` in this process (the exit code, stderr and the absence of a traceback are the
same as through `python -m zili`, and each subprocess would cost seconds of importing torch on 2 cores); a few go
through `python -m zili` as a user would, among them the bare `zili`, which prints the help. The inputs are
built once for the module: bad files, a prepared dataset with a shard cut short, a run trained for one step and
its Hugging Face export (and damaged copies of that)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, seed_peak_flops
from zili.cli import DESCRIPTION, main

# `zili train` arguments that make a run that passes every check a 1-step one in seconds (never the 400-step demo)
TRAIN = ["train", *TINY_MODEL, "--data.dataset={data}", "--training.steps=1", "--training.eval_every=0"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dataset, corpus_files, peak_flops):
    """Paths for the rows' `{name}` placeholders: a trained run, its export, and bad files of every kind."""
    root = tmp_path_factory.mktemp("bad-inputs")
    bad, run, hf = root / "bad", root / "run", root / "hf"
    bad.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ZILI_CACHE", str(root / "cache"))
        seed_peak_flops(root / "cache")
        main([*(a.format(data=tiny_dataset) for a in TRAIN), f"--training.run_dir={run}", "--checkpoint.keep=1"])
        main(["export-hf", str(run), str(hf)])

    (bad / "empty.txt").write_text("")
    (bad / "a-file").write_text("not a directory\n")
    (bad / "not-toml.toml").write_text("this is = = not toml [\n")
    (bad / "binary.toml").write_bytes(b"\xff\xfe\x00 not text")
    (bad / "unknown-section.toml").write_text("[trainig]\nsteps = 3\n")
    (bad / "no-section.toml").write_text("steps = 3\n")
    (bad / "wrong-type.toml").write_text('[training]\nsteps = "many"\n')
    (bad / "not-json.json").write_text("{nope")
    (bad / "a-list.json").write_text("[1, 2]\n")
    (bad / "empty-dir").mkdir()
    (bad / "bad-tokenizer").mkdir()
    (bad / "bad-tokenizer" / "tokenizer.json").write_text("garbage")
    short = shutil.copytree(tiny_dataset, bad / "short-shard")
    shard = sorted(short.glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    broken_manifest = shutil.copytree(tiny_dataset, bad / "broken-manifest")
    (broken_manifest / "manifest.json").write_text("{")
    (shutil.copytree(hf, bad / "hf-bad-json") / "config.json").write_text("{oops")
    (shutil.copytree(hf, bad / "hf-json-list") / "config.json").write_text("[]")
    weights = shutil.copytree(hf, bad / "hf-truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # the header intact, the data cut short
    (shutil.copytree(hf, bad / "hf-bad-index") / "model.safetensors.index.json").write_text("[1, 2")
    (shutil.copytree(hf, bad / "hf-no-tokenizer") / "tokenizer.json").unlink()
    locked = bad / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    yield {"data": tiny_dataset, "tok": tiny_dataset / "tokenizer", "text": corpus_files[0], "run": run, "hf": hf,
           "bad": bad, "root": root}
    locked.chmod(0o700)


def snapshot(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


@pytest.fixture
def zili_in_process(tmp_path, monkeypatch, capsys):
    """`zili ARGS` through zili.cli.main in this process, in a fresh directory: a CompletedProcess. An exception
    other than SystemExit (a traceback) fails the test as it is."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ZILI_CACHE", str(tmp_path / "cache"))
    seed_peak_flops(tmp_path / "cache")

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["zili", *args], code, out.out, out.err)

    run.work = work
    return run


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0], lines[0]


ROWS = [
    # the config: keys, types and ranges (zili.config), on the command line and in a --config file
    (["train", "--training.stepz=3"], "unknown config key 'training.stepz' — [training] has:"),
    (["train", "--trainig.steps=3"], "unknown config key 'trainig.steps' — sections are:"),
    ([*TRAIN, "--training.steps=abc"], "training.steps: expected an integer, got 'abc'"),
    ([*TRAIN, "--metrics.progress=maybe"], "metrics.progress: expected true or false"),
    ([*TRAIN, "--optimizer.lr=fast"], "optimizer.lr: expected a number, got 'fast'"),
    ([*TRAIN, "--optimizer.lr=nan"], "optimizer.lr: expected a finite number, got 'nan'"),
    ([*TRAIN, "--training.grad_clip=inf"], "training.grad_clip: expected a finite number, got 'inf'"),
    ([*TRAIN, "--optimizer.lr=-1"], "optimizer.lr must be positive, got -1.0"),
    ([*TRAIN, "--optimizer.lr=-0.1"], "optimizer.lr must be positive"),
    ([*TRAIN, "--training.steps=0"], "training.steps must be positive, got 0"),
    ([*TRAIN, "--training.dtype=fp64"], "training.dtype: 'fp64' is not allowed — choose one of bf16, fp32"),
    ([*TRAIN, "--optimizer.beta2=1.0"], "optimizer.beta2 must be in [0, 1), got 1.0"),
    ([*TRAIN, "--data.val_fraction=1.5"], "data.val_fraction must be in [0, 1), got 1.5"),
    ([*TRAIN, "--parallelism.cp=0"], "parallelism.cp must be positive, got 0"),
    ([*TRAIN, "--model.rope_theta=-5"], "model.rope_theta must be positive, got -5.0"),
    ([*TRAIN, "--model.n_heads=4", "--model.n_kv_heads=3"], "n_kv_heads"),
    ([*TRAIN, "--training.micro_batch_size=3"], "must be a multiple of training.micro_batch_size (3)"),
    ([*TRAIN, "--training.seq_len=4096"], "training.seq_len 4096 exceeds the model's max_seq_len"),
    (["train", "foo"], "unexpected argument 'foo' — overrides look like --section.key=value"),
    (["train", "--training.steps"], "'--training.steps' needs a value"),
    (["train", "--config"], "argument --config: expected one argument"),
    (["train", "--config", "missing.toml"], "config file 'missing.toml' not found"),
    (["train", "--config", "{bad}/not-toml.toml"], "not valid TOML"),
    (["train", "--config", "{bad}/binary.toml"], "not valid TOML ('utf-8' codec can't decode"),
    (["train", "--config", "{bad}/unknown-section.toml"], "unknown config key 'trainig.steps'"),
    (["train", "--config", "{bad}/no-section.toml"], "'steps' must be a [section] table"),
    (["train", "--config", "{bad}/wrong-type.toml"], "training.steps: expected an integer, got 'many'"),
    # zili data
    (["data"], "zili data: the following arguments are required"),
    (["data", "prepare", "--input", "missing.txt", "--tokenizer", "{tok}", "--output", "out"],
     "input missing.txt does not exist"),
    (["data", "prepare", "--input", "{bad}/empty.txt", "--tokenizer", "{tok}", "--output", "out"], "is empty"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{tok}", "--output", "out", "--format", "xml"],
     "argument --format: invalid choice: 'xml'"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{bad}/bad-tokenizer", "--output", "out"],
     "cannot read"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{bad}/empty-dir", "--output", "out"],
     "no tokenizer.json in"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{tok}", "--output", "{bad}/a-file"],
     "already exists and is not empty"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{tok}", "--output", "{bad}/a-file/out"],
     "a-file is a file, not a directory"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{tok}", "--output", "out", "--workers", "0"],
     "workers must be at least 1"),
    (["data", "prepare", "--input", "{text}", "--tokenizer", "{tok}"], "required: --output"),
    (["data", "train-tokenizer", "--input", "missing.txt", "--vocab-size", "300", "--output", "tok"],
     "input missing.txt does not exist"),
    (["data", "train-tokenizer", "--input", "{bad}/empty.txt", "--vocab-size", "300", "--output", "tok"],
     "no text to train the tokenizer on"),
    (["data", "train-tokenizer", "--input", "{text}", "--vocab-size", "300", "--output", "{bad}/a-file"],
     "is a file"),
    (["data", "train-tokenizer", "--input", "{text}", "--vocab-size", "300", "--output", "{bad}/a-file/tok"],
     "a-file is a file, not a directory"),
    (["data", "train-tokenizer", "--input", "{text}", "--vocab-size", "0", "--output", "tok"],
     "vocab_size 0 is too small"),
    (["data", "train-tokenizer", "--input", "{text}", "--vocab-size", "ten", "--output", "tok"],
     "argument --vocab-size: invalid int value: 'ten'"),
    # zili train: the dataset, the run directory, the layout, the starting point
    ([*TRAIN, "--data.dataset=no/such/dir"], "dataset no/such/dir does not exist"),
    ([*TRAIN, "--data.dataset={bad}/empty-dir"], "has no manifest.json, so it is not a prepared dataset"),
    ([*TRAIN, "--data.dataset={bad}/short-shard"], "is 100 bytes but the manifest says"),
    ([*TRAIN, "--data.dataset={bad}/broken-manifest"], "manifest.json is unreadable"),
    ([*TRAIN, "--training.run_dir={bad}/a-file"], "cannot be written (File exists"),
    ([*TRAIN, "--training.run_dir={bad}/a-file/run"], "cannot be written (Not a directory"),
    pytest.param([*TRAIN, "--training.run_dir={bad}/read-only/run"], "cannot be written (Permission denied",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory"),
                 id="train-run_dir-read-only"),
    ([*TRAIN, "--parallelism.tp=2"], "the [parallelism] layout needs 2 processes but this is a single process"),
    ([*TRAIN, "--checkpoint.resume={bad}/empty-dir"], "is not a checkpoint directory"),
    (["train", "--data.dataset={data}", "--model.init=hf:no/such"], "no/such/config.json not found"),
    (["train", "--data.dataset={data}", "--model.init=run:no/such"], "no such run directory"),
    # zili generate
    (["generate", "no/such/run", "--prompt", "hi"], "run directory 'no/such/run' not found"),
    (["generate", "{bad}/empty-dir", "--prompt", "hi"], "no complete checkpoint"),
    (["generate", "{run}"], "the following arguments are required: --prompt"),
    (["generate", "{run}", "--prompt", "hi", "--temperature", "-1"], "--temperature >= 0"),
    (["generate", "{run}", "--prompt", "hi", "--temperature", "hot"], "argument --temperature: invalid float value"),
    (["generate", "{run}", "--prompt", "hi", "--step", "99"], "no checkpoint for step 99"),
    # zili import-hf
    (["import-hf", "no/such/hf", "out"], "no/such/hf is not a directory"),
    (["import-hf", "{bad}/empty-dir", "out"], "config.json not found"),
    (["import-hf", "{bad}/hf-bad-json", "out"], "config.json is not valid JSON"),
    (["import-hf", "{bad}/hf-truncated", "out"], "model.safetensors is not a readable safetensors file"),
    (["import-hf", "{bad}/hf-json-list", "out"], "config.json holds a JSON list, not an object"),
    (["import-hf", "{bad}/hf-bad-index", "out"], "model.safetensors.index.json is not a valid index"),
    (["import-hf", "{bad}/hf-no-tokenizer", "out"], "tokenizer.json not found"),
    (["import-hf", "{hf}", "{bad}/a-file"], "a-file is a file"),
    (["import-hf", "{hf}", "{bad}/a-file/run"], "a-file is a file, not a directory"),
    (["import-hf", "{hf}", "out", "--mtp-depth", "2"], "argument --mtp-depth: invalid choice: 2"),
    # zili export-hf
    (["export-hf", "no/such/run", "out"], "run directory 'no/such/run' not found"),
    (["export-hf", "{bad}/empty-dir", "out"], "no complete checkpoint"),
    (["export-hf", "{run}", "{bad}/a-file"], "a-file is a file"),
    (["export-hf", "{run}", "{bad}/a-file/hf"], "a-file is a file, not a directory"),
    (["export-hf", "{run}", "out", "--step", "99"], "no checkpoint for step 99"),
    (["export-hf", "{run}", "out", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["export-hf", "{run}", "out", "--max-shard-gb", "0"], "--max-shard-gb must be positive"),
    # zili bench
    (["bench", "--workload", "nope"], "argument --workload: invalid choice: 'nope'"),
    (["bench", "--workload", "dense-tiny", "--steps", "0"], "--steps >= 1"),
    (["bench", "--workload", "dense-tiny", "--json", "{bad}/a-file/b.json"], "a-file is a file, not a directory"),
    (["bench", "--compare", "{bad}/not-json.json"], "cannot read bench result"),
    (["bench", "--compare", "missing.json"], "cannot read bench result missing.json"),
    (["bench", "--compare", "{bad}/binary.toml"], "cannot read bench result"),
    (["bench", "--compare", "{bad}/a-list.json"], "is not a `zili bench --json` result"),
    # zili plan
    (["plan", "--chip", "no-such-chip", "--count", "8", "--model", "llama3-8b"], "--chip 'no-such-chip' is neither"),
    (["plan", "--chip", "h100-sxm", "--count", "8", "--model", "no-such-model"], "--model 'no-such-model' is neither"),
    (["plan", "--chip", "h100-sxm", "--count", "8", "--model", "llama3-8b", "--tp", "3"],
     "tp=3 does not divide the model's n_heads"),
    (["plan", "--chip", "h100-sxm", "--count", "-8", "--model", "llama3-8b"],
     "--count and --per-node must be positive"),
    (["plan", "--chip", "h100-sxm", "--count", "8", "--model", "llama3-8b", "--tp", "0"], "--tp must be positive"),
    (["plan", "--chip", "h100-sxm", "--count", "8", "--model", "llama3-8b", "--tokens", "lots"],
     "--tokens 'lots' is not a positive amount"),
    (["plan", "--chip", "h100-sxm", "--count", "8"], "give either --model"),
    # zili chat and zili eval
    (["chat", "no/such/model"], "is neither a zili run directory nor a Hugging Face model directory"),
    (["chat", "{run}", "--temperature", "-1"], "--temperature >= 0"),
    (["chat", "{run}", "--top-p", "2"], "0 < --top-p <= 1"),
    (["chat", "{run}", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value"),
    (["chat", "{bad}/hf-bad-json"], "config.json is not valid JSON"),
    (["eval", "no/such/model", "--data", "{data}"], "model no/such/model not found"),
    (["eval", "{bad}/hf-truncated", "--data", "{data}"], "model.safetensors is not a readable safetensors file"),
    (["eval", "{run}"], "one of the arguments --data --tasks is required"),
    (["eval", "{run}", "--data", "no/such/data"], "--data no/such/data not found"),
    (["eval", "{run}", "--data", "{bad}/empty-dir"], "has no manifest.json"),
    (["eval", "{run}", "--data", "{data}", "--batch-size", "0"], "--batch-size must be positive"),
    (["eval", "{run}", "--data", "{data}", "--limit", "3"], "--limit goes with --tasks, not --data"),
    (["eval", "{run}", "--data", "{data}", "--json", "no/dir/e.json"], "its directory does not exist"),
    # zili chips, and the command itself
    (["chips", "extra"], "zili chips: unrecognized arguments: extra"),
    (["frobnicate"], "unknown command 'frobnicate' — use one of:"),
    (["--bogus"], "unknown command '--bogus'"),
]


def _row_id(row) -> str:
    args = [a for a in row[0] if a not in TRAIN[1:] and a != "--data.dataset={data}"]
    return " ".join(args).replace("{", "").replace("}", "")[:80]


@pytest.mark.parametrize("args, fragment", [row if hasattr(row, "marks") else pytest.param(*row, id=_row_id(row))
                                            for row in ROWS])
def test_bad_input(inputs, zili_in_process, args, fragment):
    """One line, exit 2, no traceback, and nothing new in the working directory or in any input directory."""
    watched = (zili_in_process.work, inputs["root"], inputs["data"])
    before = snapshot(*watched)
    proc = zili_in_process(*(arg.format(**inputs) for arg in args))
    assert_user_error(proc, fragment)
    left = snapshot(*watched) - before
    assert not left, f"left behind: {sorted(map(str, left))}"


def test_resume_from_another_model(inputs, zili_in_process, tmp_path):
    """Resuming a run with another model architecture names the difference."""
    run = shutil.copytree(inputs["run"], tmp_path / "run")
    before = snapshot(run / "checkpoints")
    proc = zili_in_process(*(a.format(**inputs) for a in TRAIN), "--model.dim=128", "--training.steps=4",
                           f"--training.run_dir={run}", "--checkpoint.resume=auto")
    assert_user_error(proc, "another model: dim=64 (now 128)")
    assert snapshot(run / "checkpoints") == before


def test_help(zili_in_process):
    for flag in ("--help", "-h"):
        proc = zili_in_process(flag)
        assert proc.returncode == 0 and proc.stdout.strip() == DESCRIPTION.strip() and not proc.stderr


def test_bare_zili_prints_the_help(tmp_path):
    """`zili` alone prints the commands and exits 0, as git does; it does not start the demo (`zili train` does)."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ZILI_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "zili"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)  # were it to train the demo instead, this ends it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == DESCRIPTION.strip() and not proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_input_through_python_m_zili(zili_cli):
    """A row through `python -m zili` in a subprocess (seconds of importing torch): the real exit code and stderr."""
    assert_user_error(zili_cli("chips", "--bogus"), "zili chips: unrecognized arguments: --bogus — see")
