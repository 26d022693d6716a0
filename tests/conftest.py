"""Shared fixtures: a small prepared dataset built offline from the Python standard library's sources,
and a helper that runs the `zili` CLI in a subprocess as a user would."""

from __future__ import annotations

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


@pytest.fixture
def zili_cli(tmp_path):
    """Run `python -m zili ARGS...`; returns the CompletedProcess (text output)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ZILI_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "zili", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"zili {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
