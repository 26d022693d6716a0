"""What a run does when the world interrupts it, with real processes joined by gloo: a stop signal (preemption), a
rank that hangs (collective timeout), a rank that dies under `torchrun --max-restarts` (elastic restart). Faults are
injected with ZILI_FAULT (zili/train/faults.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed.conftest import PARITY, _env, assert_losses_match, check_ok, read_records
from zili.checkpoint import list_checkpoints, read_model_tensor, verify
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer


def test_a_signal_on_one_rank_stops_both_after_the_same_step_and_the_resume_matches(
        zili_ranks, tiny_dataset, reference_runs, tmp_path, monkeypatch):
    """SIGTERM reaches rank 1 alone after step 8: both ranks finish step 8, write its checkpoint and exit 0; the
    resumed run's losses equal an uninterrupted (single-process) run's. The checkpoints are written in the
    background (every 3 steps, on the ranks' own gloo group): the stop waits for step 8's to be complete."""
    run_dir = tmp_path / "run"
    args = [*PARITY, f"--data.dataset={tiny_dataset}", "--model.n_layers=2", f"--training.run_dir={run_dir}"]
    monkeypatch.setenv("ZILI_FAULT", "signal:1:8:TERM")
    first = zili_ranks(2, *args, "--checkpoint.async_save=true", "--checkpoint.every=3")
    check_ok(first)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000006", "step-0000008"]
    assert all(verify(p).usable for p in list_checkpoints(run_dir))
    assert "SIGTERM received" in first[1].stderr and "stopping after step 8 on a stop signal" in first[0].stdout
    assert max(read_records(run_dir)) == 8
    monkeypatch.delenv("ZILI_FAULT")
    check_ok(zili_ranks(2, *args, "--checkpoint.resume=auto"))
    records = read_records(run_dir)
    assert sorted(records) == list(range(21))
    assert_losses_match(reference_runs[2], records, range(21))


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import os, signal, time\n"
              "from zili.train.preemption import StopRequest\n"
              "stop = StopRequest(); stop.install()\n"
              "os.kill(os.getpid(), signal.SIGUSR1)\n"
              "assert stop.agreed()\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGUSR1 received" in proc.stderr and "SIGTERM again: exiting now" in proc.stderr


def test_a_hung_rank_ends_the_run_with_one_line_naming_the_rank_and_the_operation(
        zili_ranks, tiny_dataset, tmp_path, monkeypatch):
    """Rank 1 sleeps 10 s after step 2 with distributed.timeout_s=4: rank 0's next collective gives up, one line,
    non-zero exit — no endless hang, no traceback. Rank 1, waking to a peer gone, says so in one line too."""
    monkeypatch.setenv("ZILI_FAULT", "sleep:1:2:10")
    began = time.monotonic()
    results = zili_ranks(2, *PARITY, f"--data.dataset={tiny_dataset}", "--model.n_layers=2",
                         f"--training.run_dir={tmp_path / 'run'}", "--distributed.timeout_s=4", timeout=120)
    assert time.monotonic() - began < 100  # ended by the timeout, not by the test's kill
    for r in results:
        assert r.returncode == 1, r.stderr[-2000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert errors[0].startswith(f"error: rank {r.rank}: all_reduce in agreed (preemption.py:")
    assert "waited more than distributed.timeout_s=4 s" in results[0].stderr
    assert "another rank went away" in results[1].stderr or "waited more than" in results[1].stderr


@pytest.mark.slow
def test_torchrun_restarts_a_dead_rank_from_the_newest_checkpoint_bit_for_bit(tiny_dataset, tmp_path, peak_flops):
    """`torchrun --max-restarts 1`, rank 1 killed (SIGKILL) after step 7 with checkpoints every 3 steps: the job
    restarts by itself from step 6 and its final weights equal an uninterrupted run's, bit for bit (fp32)."""
    def torchrun(run_dir, *extra, env_extra=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *extra,
               "-m", "zili", "train", *PARITY, f"--data.dataset={tiny_dataset}", "--model.n_layers=2",
               "--training.steps=10", "--checkpoint.every=3", "--checkpoint.keep=5", f"--training.run_dir={run_dir}"]
        return subprocess.run(cmd, env={**_env(tmp_path), **(env_extra or {})}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    plain = torchrun(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    # torchrun's workers share its rendezvous store by default, and a restarted attempt may then read the dead
    # attempt's gloo addresses (pytorch/pytorch#135712): a store of their own per attempt, as docs/multi-node.md says
    restarted = torchrun(tmp_path / "restarted", "--max-restarts=1", "--monitor-interval=0.2",
                         env_extra={"ZILI_FAULT": "kill:1:7", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from" in restarted.stdout and "step-0000006 at step 6" in restarted.stdout
    ours, theirs = list_checkpoints(tmp_path / "restarted")[-1], list_checkpoints(tmp_path / "plain")[-1]
    assert ours.name == theirs.name == "step-0000010"
    args = ModelArgs(**json.loads((theirs / "meta.json").read_text())["model"])
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    for name, shape in names.items():
        assert torch.equal(read_model_tensor(ours, name, shape), read_model_tensor(theirs, name, shape)), name
