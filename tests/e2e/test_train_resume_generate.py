"""End to end through the CLI: train, interrupt, resume exactly, generate deterministically."""

import json

import pytest

from tests.conftest import TINY_MODEL
from zili.config import load_config


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in records}


@pytest.mark.slow  # ~20 s; exact resume stays in the default run: tests/e2e/test_checkpoint_verify.py (bit-equal
# weights after a resume), tests/distributed/test_fault_tolerance.py (2 ranks, stop signal, losses)
def test_interrupted_run_resumes_with_identical_losses(zili_cli, tiny_dataset, tmp_path):
    common = [*TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=40", "--metrics.log_every=1",
              "--training.eval_every=10", "--checkpoint.every=10", "--checkpoint.keep=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    zili_cli("train", *common, f"--training.run_dir={whole}", check=True)
    first = zili_cli("train", *common, f"--training.run_dir={parts}", "--training.exit_after=20", check=True)
    assert "stopping after step 20" in first.stdout
    assert max(losses(parts)) == 20
    second = zili_cli("train", *common, f"--training.run_dir={parts}", "--checkpoint.resume=auto", check=True)
    assert "resumed from" in second.stdout and "step 20" in second.stdout

    a, b = losses(whole), losses(parts)
    assert sorted(a) == sorted(b) == list(range(0, 41))
    for step in range(21, 41):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
    assert a[40][0] < a[1][0]  # it learned something

    ckpts = sorted(p.name for p in (parts / "checkpoints").iterdir())
    assert ckpts == ["step-0000030", "step-0000040"]  # keep=2, no temporary directories left
    assert load_config(parts / "config.toml").training.steps == 40


def test_metrics_records_have_the_contract_keys(zili_cli, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    zili_cli("train", *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=6",
             "--metrics.log_every=3", "--training.eval_every=6", f"--training.run_dir={run}", check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    for r in records[1:]:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gb"] > 0
    assert "val_loss" in records[0] and "val_loss" in records[2] and "val_loss" not in records[1]
    assert (run / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow  # ~19 s; greedy determinism is also checked in-process (tests/unit/test_sampling.py)
def test_generate_greedy_is_deterministic(zili_cli, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    zili_cli("train", *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=12",
             f"--training.run_dir={run}", check=True)
    outs = [zili_cli("generate", run, "--prompt", "def parse", "--temperature", "0", "--max-new-tokens", "24",
                     check=True).stdout for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].startswith("def parse") and len(outs[0]) > len("def parse") + 5
    sampled = zili_cli("generate", run, "--prompt", "def parse", "--seed", "1", check=True).stdout
    assert sampled.startswith("def parse")
