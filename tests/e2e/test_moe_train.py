"""A mixture-of-experts model (DeepSeek-V3's feed-forward: dense first block, grouped sigmoid routing, shared
expert, balancing bias) trains through `zili train` on one device: the loss falls, each logged step carries the
expert load, the balancing bias moves and is checkpointed, and an interrupted run resumes with identical losses
(multi-process layouts: tests/distributed/test_expert_parallel.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import TINY_MODEL
from zili.checkpoint import list_checkpoints

MOE = [*TINY_MODEL, "--model.preset=tiny-moe", "--model.n_layers=2", "--model.dim=64", "--model.ffn_dim=128",
       "--metrics.log_every=1", "--training.eval_every=0", "--moe.bias_update_rate=0.01"]


def records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # ~24 s; expert-parallel resume (tests/distributed/test_expert_parallel.py) stays in the default run
def test_moe_model_trains_balances_and_resumes_exactly(zili_cli, tiny_dataset, tmp_path):
    common = [*MOE, f"--data.dataset={tiny_dataset}", "--training.steps=12", "--checkpoint.every=6"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    zili_cli("train", *common, f"--training.run_dir={whole}", check=True)
    zili_cli("train", *common, f"--training.run_dir={parts}", "--training.exit_after=6", check=True)
    resumed = zili_cli("train", *common, f"--training.run_dir={parts}", "--checkpoint.resume=auto", check=True)
    assert "resumed from" in resumed.stdout

    a, b = records(whole), records(parts)
    assert [a[s]["loss"] for s in range(7, 13)] == [b[s]["loss"] for s in range(7, 13)]  # bit for bit
    assert [a[s]["expert_load"] for s in range(7, 13)] == [b[s]["expert_load"] for s in range(7, 13)]
    assert a[12]["loss"] < a[1]["loss"]
    assert all(a[s]["expert_load"] >= 1.0 for s in range(1, 13))

    last = list_checkpoints(whole)[-1]  # the balancing bias is model state: checkpointed, and it moved
    keys = [k for k in dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata
            if k.endswith("e_score_correction_bias")]
    assert len(keys) == 1  # one expert layer (the first block is dense)
    state = {keys[0]: torch.zeros(16)}
    dcp.load(state, checkpoint_id=str(last))
    assert state[keys[0]].abs().max() > 0

    # a checkpoint whose expert count differs from the config: one line, exit 2
    other = zili_cli("train", *common, f"--training.run_dir={parts}", "--checkpoint.resume=auto",
                     "--model.n_routed_experts=8", "--model.n_group=2", "--training.steps=14")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "n_routed_experts=16 (now 8)" in other.stderr

