"""GRPO on 2 gloo ranks with FSDP: sampling on the sharded policy, the same rollouts and losses as one process,
and an exact resume (metrics and final weights bit for bit)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import check_ok, read_records

transformers = pytest.importorskip("transformers")


def grpo_args(hf_dir, prompts, run_dir, *extra):
    return ["--training.objective=grpo", f"--model.init=hf:{hf_dir}", f"--rl.prompts={prompts}",
            "--rl.reward=tests.distributed.grpo_rewards:reward", "--rl.group_size=4", "--rl.max_new_tokens=6",
            "--rl.kl_beta=0.05", "--training.batch_size=2", "--training.steps=4", "--training.seq_len=64",
            "--training.dtype=fp32", "--metrics.log_every=1", "--training.eval_every=0", "--checkpoint.every=2",
            "--metrics.progress=false", "--training.sample_tokens=0", "--optimizer.lr=1e-3",
            "--optimizer.warmup_steps=0", f"--training.run_dir={run_dir}", *extra]


@pytest.fixture
def start(tmp_path):
    from tests.interop.conftest import build_hf

    hf = build_hf("qwen2", tmp_path / "hf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a} plus 1", "answer": str(a + 1)}) + "\n" for a in range(8)))
    return hf, prompts


@pytest.mark.slow  # ~41 s; the single-process GRPO resume (tests/interop/test_grpo_train.py) is in the default run
def test_grpo_on_two_fsdp_ranks_matches_one_process_and_resumes_exactly(start, tmp_path, zili_ranks, zili_cli):
    hf, prompts = start
    one, whole, parts = tmp_path / "one", tmp_path / "whole", tmp_path / "parts"
    assert zili_cli("train", *grpo_args(hf, prompts, one)).returncode == 0
    check_ok(zili_ranks(2, *grpo_args(hf, prompts, whole, "--parallelism.dp_shard=2")))
    reference, sharded = read_records(one), read_records(whole)
    for step in range(1, 5):  # the same rollouts (rewards) and, to float precision, the same losses
        assert sharded[step]["reward_mean"] == reference[step]["reward_mean"], step
        assert sharded[step]["completion_len"] == reference[step]["completion_len"], step
        assert abs(sharded[step]["loss"] - reference[step]["loss"]) <= 1e-4 * max(abs(reference[step]["loss"]), 1e-3)
    check_ok(zili_ranks(2, *grpo_args(hf, prompts, parts, "--parallelism.dp_shard=2", "--training.exit_after=2")))
    check_ok(zili_ranks(2, *grpo_args(hf, prompts, parts, "--parallelism.dp_shard=2", "--checkpoint.resume=auto")))
    drop = ("tokens_per_s", "mfu", "peak_mem_gb")
    resumed = read_records(parts)
    assert {s: {k: v for k, v in r.items() if k not in drop} for s, r in resumed.items()} == \
           {s: {k: v for k, v in r.items() if k not in drop} for s, r in sharded.items()}
    for d in (whole, parts):
        assert zili_cli("export-hf", d, tmp_path / f"out-{d.name}").returncode == 0
    wa, wb = (load_file(tmp_path / f"out-{d.name}" / "model.safetensors") for d in (whole, parts))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
