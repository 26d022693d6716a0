"""Real multi-process runs on CPU with gloo: `zili_ranks(n, *args)` starts n ranks of `zili train` (forked from one
process that imported zili, see fork_ranks.py) with the environment torchrun would give them (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT), waits for all of them and returns their results; `zili_torchrun` goes through
torchrun and `python -m zili` itself; `python_ranks(n, script, *args)` runs any Python script the same way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, seed_peak_flops

REPO = Path(__file__).resolve().parents[2]
# 20 logged steps of a tiny untied model in fp32, with validation at 0, 10 and 20 and the sequence ids
PARITY = [*TINY_MODEL, "--training.batch_size=8", "--training.steps=20", "--metrics.log_every=1",
          "--training.eval_every=10", "--model.tied_embeddings=false", "--metrics.log_sequence_ids=true"]


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict:
    seed_peak_flops(tmp_path / "cache")
    return {**os.environ, "ZILI_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def zili_ranks(tmp_path, peak_flops):
    """Run `zili train ARGS` as `n` real processes joined by gloo; returns one RankResult per rank."""

    def run(n: int, *args: str, timeout: int = 300) -> list[RankResult]:
        return launch_zili_ranks(n, list(map(str, args)), tmp_path, timeout)

    return run


def launch_zili_ranks(n: int, args: list[str], tmp_path: Path, timeout: int) -> list[RankResult]:
    """`zili train ARGS` as `n` processes with torchrun's environment in `tmp_path`, forked from one process that
    imported zili (fork_ranks.py); each rank's output includes what the import printed."""
    out = Path(tempfile.mkdtemp(prefix="ranks-", dir=tmp_path))
    launcher = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_ranks.py")), str(out), str(n),
                                 str(_free_port()), "--", *args], env=_env(tmp_path), cwd=tmp_path,
                                start_new_session=True)
    try:
        launcher.wait(timeout=timeout)
    finally:
        if launcher.poll() is None or any(not (out / f"rank{r}.rc").exists() for r in range(n)):
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and every rank still running
            launcher.wait()

    def text(name: str) -> str:
        path = out / name
        return path.read_text() if path.exists() else ""

    results = [RankResult(rank, int(text(f"rank{rank}.rc") or -9), text("import.out") + text(f"rank{rank}.out"),
                          text("import.err") + text(f"rank{rank}.err")) for rank in range(n)]
    shutil.rmtree(out)
    return results


@pytest.fixture
def zili_torchrun(tmp_path, peak_flops):
    """Run `torchrun --standalone --nproc-per-node N -m zili train ARGS` (the documented launch)."""

    def run(n: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "zili", "train", *map(str, args)]
        return subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    return run


def launch_ranks(n: int, argv: list[str], tmp_path: Path, timeout: int) -> list[RankResult]:
    """Run the command `argv` as `n` processes with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT; OMP_NUM_THREADS=1) in `tmp_path`; wait for all of them."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = {**_env(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            results.append(RankResult(rank, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.fixture
def python_ranks(tmp_path):
    """Run `python SCRIPT ARGS` as `n` real processes (join them with `init_process_group("gloo")`)."""

    def run(n: int, script, *args, timeout: int = 300) -> list[RankResult]:
        return launch_ranks(n, [sys.executable, str(script), *map(str, args)], tmp_path, timeout)

    return run


def check_ok(results: list[RankResult]) -> None:
    failed = [r for r in results if r.returncode != 0]
    assert not failed, "\n".join(f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-3000:]}" for r in failed)


def read_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run, keyed by step."""
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def assert_losses_match(reference: dict[int, dict], other: dict[int, dict], steps, rel: float = 1e-4) -> None:
    """Train losses of `steps` (and any validation losses there) equal within `rel` relative."""
    for step in steps:
        for key in ("loss", "val_loss"):
            want, got = reference[step].get(key), other[step].get(key)
            if want is None:
                continue
            assert got is not None and abs(got - want) <= rel * abs(want), f"step {step} {key}: {got} vs {want}"


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, tiny_dataset, peak_flops):
    """Single-process runs of PARITY with 2 and 4 layers: {n_layers: metrics by step}."""
    root = tmp_path_factory.mktemp("reference")
    env = _env(root)
    runs = {}
    for layers in (2, 4):
        run_dir = root / f"layers{layers}"
        subprocess.run([sys.executable, "-m", "zili", "train", *PARITY, f"--data.dataset={tiny_dataset}",
                        f"--model.n_layers={layers}", f"--training.run_dir={run_dir}"],
                       env=env, cwd=root, check=True, capture_output=True, timeout=300)
        runs[layers] = read_records(run_dir)
    return runs
