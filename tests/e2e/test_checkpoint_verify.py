"""Verified checkpoints through the CLI: `zili checkpoint verify` finds a damaged checkpoint (exit 1), a resume skips
it with one warning and ends with the weights of an uninterrupted run, a resume on other data is refused, and a
full disk during a save stops the run with one line, exit 2, the previous checkpoint intact.

The CLI runs in this process (zili.cli.main, as tests/e2e/test_bad_inputs.py does): seconds faster on 2 cores."""

import errno
import json
import os
import subprocess
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import TINY_MODEL, seed_peak_flops
from zili.cli import main


@pytest.fixture
def zili(tmp_path, monkeypatch, capsys, peak_flops):
    """`zili ARGS` through zili.cli.main in this process: a CompletedProcess (exit code, stdout, stderr)."""
    seed_peak_flops(tmp_path / "cache")
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


def model_tensors(path):
    """Every `model.*` tensor of the checkpoint at `path`."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.items()
             if k.startswith("model.")}
    with warnings.catch_warnings():  # DCP notes that no process group exists: one process is meant
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path))
    return state


def losses(run_dir):
    """{step: loss} of metrics.jsonl (a resumed run replaces the records after its step)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_damaged_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(zili, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    common = [*TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=4", "--checkpoint.every=2",
              "--checkpoint.keep=3", "--metrics.log_every=1", "--training.eval_every=0", f"--training.run_dir={run}"]
    first = zili("train", *common)
    assert first.returncode == 0, first.stderr
    newest = run / "checkpoints" / "step-0000004"
    reference, uninterrupted = model_tensors(newest), losses(run)
    assert zili("checkpoint", "verify", run).stdout.splitlines() == ["step-0000002: ok", "step-0000004: ok"]

    data = newest / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one flipped bit
    data.write_bytes(bytes(raw))
    report = zili("checkpoint", "verify", run)
    assert report.returncode == 1
    assert report.stdout.splitlines()[0] == "step-0000002: ok"
    assert report.stdout.splitlines()[1].startswith("step-0000004: DAMAGED: __0_0.distcp: checksum mismatch")
    assert zili("checkpoint", "verify", newest, "--quick").returncode == 0  # sizes only: a flipped bit passes

    # another seq_len or validation split: refused, before anything is trained
    other = zili("train", *common, "--checkpoint.resume=auto", "--training.seq_len=16", "--data.val_fraction=0.05")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was trained on other data: training.seq_len=16 (it trained with 32), " \
                                "data.val_fraction=0.05 (it trained with 0.01) — resume with the original" in errors[0]

    second = zili("train", *common, "--checkpoint.resume=auto")
    assert second.returncode == 0, second.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'} at step 2" in second.stdout
    warnings = [line for line in second.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: checkpoint {newest} is damaged (__0_0.distcp: checksum mismatch")
    assert warnings[0].endswith("— skipped; using step-0000002")
    assert losses(run) == uninterrupted and sorted(uninterrupted) == list(range(1, 5))
    again = model_tensors(newest)  # written again, by the resumed run
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)
    assert zili("checkpoint", "verify", run).returncode == 0


@pytest.mark.slow  # ~8 s; tests/unit/test_checkpoint_verify.py covers a full disk in DCP's and zili's writes
def test_full_disk_during_a_save_stops_with_one_line_and_keeps_the_previous_checkpoint(zili, tiny_dataset, tmp_path,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    fsync, previous = os.fsync, run / "checkpoints" / "step-0000002"

    def full_after_the_first_checkpoint(fd):  # DCP fsyncs every file it writes: a full disk shows there
        if previous.is_dir():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_the_first_checkpoint)
    proc = zili("train", *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.eval_every=0",
                "--training.steps=4", "--checkpoint.every=2", f"--training.run_dir={run}")
    monkeypatch.setattr(os, "fsync", fsync)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == (f"error: no space left on device writing checkpoint step 4 to {run / 'checkpoints'} — free "
                        "space there (or lower checkpoint.keep), then resume with --checkpoint.resume=auto; the "
                        "previous checkpoint step-0000002 is intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]  # no temporary left
    assert zili("checkpoint", "verify", run).stdout == "step-0000002: ok\n"


def test_verify_without_checkpoints_is_a_user_error(zili, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = zili("checkpoint", "verify", tmp_path / "empty")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no checkpoints in")
    assert zili("checkpoint", "verify", tmp_path / "missing").returncode == 2
