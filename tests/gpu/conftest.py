"""GPU tests (marker `gpu`): they run where torch sees a CUDA device and are skipped elsewhere, so the default
CPU suite collects them and runs none. benchmarks/gpu_check.sh runs them as its `tests` part
(`pytest tests/gpu -m gpu`).

Every module here carries `pytestmark = [pytest.mark.gpu, skipif(no CUDA)]`; fixtures of tests/conftest.py
(`tiny_dataset`) apply here too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_TIMEOUT_S = 120  # one small `zili train` run: seconds on a GPU; the check's time limit covers the rest

# `zili train` with torch's deterministic algorithms (strict: an op without a deterministic variant raises and
# names itself; warn-only would leave flash attention's backward nondeterministic — see test_resume_cuda)
DETERMINISTIC_ZILI = ("import sys, torch; torch.use_deterministic_algorithms(True); "
                      "from zili.cli import main; main(sys.argv[1:])")


@pytest.fixture
def zili_train(tmp_path):
    """`run(*overrides, deterministic=False)`: `zili train OVERRIDES` in a subprocess, as a user runs it (zili from
    this checkout); with `deterministic`, torch's deterministic algorithms are switched on first (cuBLAS then
    needs CUBLAS_WORKSPACE_CONFIG). Returns the CompletedProcess; fails the test, with the output, on a non-zero
    exit."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ZILI_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}

    def run(*overrides, deterministic: bool = False) -> subprocess.CompletedProcess:
        head = ["-c", DETERMINISTIC_ZILI] if deterministic else ["-m", "zili"]
        extra = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if deterministic else {}
        proc = subprocess.run([sys.executable, *head, "train", *map(str, overrides)], capture_output=True, text=True,
                              env={**env, **extra}, cwd=tmp_path, timeout=RUN_TIMEOUT_S)
        if proc.returncode:
            raise AssertionError(f"zili train {' '.join(map(str, overrides))} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
