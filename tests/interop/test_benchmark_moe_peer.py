"""benchmarks/train_throughput.py's moe case, cheaply (no timing): its arguments, and its start-up check that zili's
weights copied into transformers' Qwen3MoeForCausalLM give the same logits — which guards the expert layout the
benchmark maps (zili's stacked w_gate/w_up/w_down -> transformers 5's gate_up_proj/down_proj)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_moe")

REPO = Path(__file__).resolve().parents[2]


def _benchmark():
    """benchmarks/train_throughput.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_case_arguments_keep_the_dense_default():
    bench = _benchmark()
    dense = bench.parse_args([])
    assert dense.case == "dense" and dense.ffn == 2816
    moe = bench.parse_args(["--case", "moe"])
    assert (moe.case, moe.experts, moe.top_k, moe.expert_ffn, moe.dim, moe.layers, moe.heads, moe.kv_heads,
            moe.seq, moe.batch) == ("moe", 32, 4, 512, 1024, 8, 16, 4, 512, 8)
    args = bench.moe_args(moe)
    assert (args.score_func, args.norm_topk_prob, args.n_shared_experts, args.n_dense_layers, args.qkv_bias,
            args.head_dim) == ("softmax", True, 0, 0, False, 64)
    with pytest.raises(SystemExit):
        bench.parse_args(["--case", "sparse"])


@pytest.mark.parametrize("tied", [False, True])
def test_same_function_check_on_a_tiny_moe(tied):
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the benchmark maps transformers 5's stacked expert weights")
    bench = _benchmark()
    opts = bench.parse_args(["--case", "moe", "--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2",
                             "--experts", "8", "--top-k", "2", "--expert-ffn", "32", "--vocab", "256", "--seq", "16",
                             "--batch", "2"] + (["--tied"] if tied else []))
    args = bench.moe_args(opts)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    step = bench.zili_side(args, torch.device("cpu"), tokens, tokens, lambda: torch.autocast("cpu", enabled=False),
                           compiled=False)
    hf = bench.hf_moe_model(args, torch.device("cpu"))
    bench.copy_to_hf(step.model, hf)
    check = bench.max_logit_difference(step.model, hf, tokens)
    assert check["max_abs_logit"] > 0.1  # not trivially zero
    assert check["max_abs_logit_diff_fp32"] < 1e-4
    # the check leaves zili's balancing counters alone (evaluation mode)
    assert all(float(layer.tokens_per_expert.sum()) == 0 for layer in step.model.expert_layers())
    # a wrong expert layout is caught: gate and up swapped in one expert
    with torch.no_grad():
        experts = hf.model.layers[0].mlp.experts
        experts.gate_up_proj[0] = experts.gate_up_proj[0].roll(32, dims=0)
    assert bench.max_logit_difference(step.model, hf, tokens)["max_abs_logit_diff_fp32"] > 1e-3
