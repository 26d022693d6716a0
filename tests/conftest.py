"""Shared fixtures: a small prepared dataset built offline from the Python standard library's sources,
a helper that runs the `zili` CLI in a subprocess as a user would, and the CPU's peak FLOP/s measured once
for the session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB_FILES = ["textwrap.py", "argparse.py", "difflib.py", "calendar.py"]

# A model small enough for CPU tests in seconds.
TINY_MODEL = ["--model.n_layers=2", "--model.dim=64", "--model.n_heads=4", "--model.n_kv_heads=2",
              "--model.ffn_dim=128", "--training.seq_len=32", "--training.batch_size=4",
              "--training.dtype=fp32", "--metrics.progress=false", "--training.sample_tokens=0"]


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [lib / name for name in STDLIB_FILES]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, corpus_files) -> Path:
    """A prepared dataset (shards + manifest + tokenizer) of ~150k tokens with a 512-token BPE."""
    from zili.data.prepare import prepare
    from zili.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny-data")
    tokenizer = train_bpe((p.read_text() for p in corpus_files), 512)
    tokenizer.save(root / "tok")
    prepare(corpus_files, root / "tok", root / "data")
    return root / "data"


_PEAK_FLOPS: dict[str, float] = {}


@pytest.fixture(scope="session")
def peak_flops(tmp_path_factory) -> dict[str, float]:
    """peak_flops.json as zili's CPU matmul probe writes it, measured once for the session with this process's
    thread count and with 1 thread (the distributed ranks'). Every test run of `zili` gets a fresh ZILI_CACHE,
    where it would otherwise measure it again (about a second of CPU per training process)."""
    import torch

    from zili import accel

    cache, before = tmp_path_factory.mktemp("probe-cache"), os.environ.get("ZILI_CACHE")
    threads = torch.get_num_threads()
    os.environ["ZILI_CACHE"] = str(cache)
    try:
        for n in sorted({threads, 1}):
            torch.set_num_threads(n)
            accel.measured_matmul_flops(torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
        if before is None:
            del os.environ["ZILI_CACHE"]
        else:
            os.environ["ZILI_CACHE"] = before
    if (cache / "peak_flops.json").is_file():  # not written when the host is oversubscribed right now
        _PEAK_FLOPS.update(json.loads((cache / "peak_flops.json").read_text()))
    return dict(_PEAK_FLOPS)


def seed_peak_flops(cache: Path) -> None:
    """Put the session's measured peak_flops.json into the ZILI_CACHE directory `cache` (if measured yet)."""
    if _PEAK_FLOPS:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "peak_flops.json").write_text(json.dumps(_PEAK_FLOPS, indent=1))


@pytest.fixture
def zili_cli(tmp_path, peak_flops):
    """Run `python -m zili ARGS...`; returns the CompletedProcess (text output)."""
    repo = Path(__file__).resolve().parents[1]
    seed_peak_flops(tmp_path / "cache")
    env = {**os.environ, "ZILI_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}

    def run(*args: str, check: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "zili", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"zili {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
