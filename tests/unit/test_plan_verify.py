"""measure_rank_bytes: the per-rank bytes it measures on a fake world equal counts derived from the shapes."""

import json

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from zili.cli import main
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.flops import param_counts, routed_expert_params
from zili.parallel.layout import Layout, trainer_problem
from zili.plan.planner import LAYOUT_KEYS
from zili.plan.spec import load_model
from zili.plan.verify import measure_rank_bytes

TINY = ModelArgs(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=64)


def layout(**values) -> Layout:
    """A layout with sequence parallelism wherever tp > 1 (the planner's default) unless given."""
    return Layout(**{"sequence_parallel": values.get("tp", 1) > 1, **values})


@pytest.fixture(autouse=True)
def _leaves_no_trace():
    yield
    assert not dist.is_initialized()
    assert torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None


def expected(blocks: int, embed: bool = False, head: bool = False, tp: int = 1, shard: int = 1, a: ModelArgs = TINY):
    """fp32 params, grads and AdamW state (exp_avg, exp_avg_sq, a 4-byte step per tensor) of `blocks` decoder
    blocks (+ embedding, + final norm and head), matrices split by tp, every tensor split by dp_shard."""
    kv = a.n_kv_heads * a.head_dim
    block = 2 * a.dim * a.dim + 2 * a.dim * kv + 3 * a.dim * a.ffn_dim
    matrices = blocks * block + (embed + head) * a.vocab_size * a.dim
    norms = (2 * blocks + head) * a.dim  # replicated over tp
    n = (matrices // tp + norms) // shard
    tensors = 9 * blocks + embed + 2 * head
    return {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * tensors, "n_params_local": n}


def check(result: dict, want: dict) -> None:
    assert {k: result[k] for k in want} == want


def test_single_process_holds_the_whole_model():
    r = measure_rank_bytes(TINY, layout())
    check(r, expected(4, embed=True, head=True))
    assert r["n_params_local"] == 180_800 and r["stage_ids"] == [0] and r["world_size"] == 1


def test_tensor_parallel_alone_splits_the_matrices():
    r = measure_rank_bytes(TINY, layout(tp=2))
    want = expected(4, embed=True, head=True, tp=2)
    assert r["params"] == want["params"] and r["optimizer"] == want["optimizer"]
    # without FSDP the embedding's gradient comes back replicated (full size) from DTensor's backward
    assert r["grads"] == want["grads"] + 4 * TINY.vocab_size * TINY.dim // 2


def test_first_and_last_pipeline_stage():
    two_stages = layout(pp=2, dp_shard=2, tp=2)
    first, last = measure_rank_bytes(TINY, two_stages, rank=0), measure_rank_bytes(TINY, two_stages, rank=7)
    assert first["stage_ids"] == [0] and last["stage_ids"] == [1] and first["world_size"] == 8
    check(first, expected(2, embed=True, tp=2, shard=2))
    check(last, expected(2, head=True, tp=2, shard=2))
    assert last["n_params_local"] - first["n_params_local"] == TINY.dim // 2  # the final norm, dp-sharded


def test_interleaved_stages():
    r = measure_rank_bytes(TINY, layout(pp=2, vpp=2, dp_shard=2, tp=2), rank=7)
    assert r["stage_ids"] == [1, 3]  # one block per stage; stage 3 is the last
    check(r, expected(2, head=True, tp=2, shard=2))


def test_dp_shard_divides_the_bytes():
    replicated = measure_rank_bytes(TINY, layout(pp=2, dp_replicate=4, tp=2))
    hybrid = measure_rank_bytes(TINY, layout(pp=2, dp_replicate=2, dp_shard=2, tp=2))
    sharded = measure_rank_bytes(TINY, layout(pp=2, dp_shard=4, tp=2))
    check(replicated, expected(2, embed=True, tp=2))
    check(hybrid, expected(2, embed=True, tp=2, shard=2))
    check(sharded, expected(2, embed=True, tp=2, shard=4))
    assert replicated["params"] == 2 * hybrid["params"] == 4 * sharded["params"]


def test_middle_stage_of_a_64_rank_world():
    r = measure_rank_bytes(TINY, layout(pp=4, dp_replicate=2, dp_shard=4, tp=2), rank=21)  # pp stride 16
    assert r["stage_ids"] == [1] and r["world_size"] == 64
    check(r, expected(1, tp=2, shard=4))  # one block, no embedding, no head


def test_recompute_and_sequence_parallel_leave_persistent_bytes_alone():
    r = measure_rank_bytes(TINY, layout(dp_shard=2, tp=2, recompute="full", sequence_parallel=False))
    check(r, expected(4, embed=True, head=True, tp=2, shard=2))


@pytest.mark.parametrize("args, lay, kw, match", [
    (TINY, layout(tp=4), {}, "n_kv_heads"),
    (TINY, layout(pp=8), {}, "layers"),
    (ModelArgs(**{**TINY.to_dict(), "tied_embeddings": True}), layout(pp=2), {}, "tied_embeddings"),
    (TINY, layout(vpp=2), {}, "pp > 1"),
    (TINY, layout(pp=2, vpp=0), {}, "at least 1"),
    (TINY, layout(tp=2), {"rank": 2}, "outside"),
])
def test_refuses_impossible_layouts(args, lay, kw, match):
    with pytest.raises(UserError, match=match):
        measure_rank_bytes(args, lay, **kw)


def test_refuses_to_run_beside_a_process_group():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="process group already exists"):
            measure_rank_bytes(TINY, layout())
    finally:
        dist.destroy_process_group()


def test_expert_parallel_rank_holds_its_experts_sharded_over_the_rest():
    """A tiny MoE (16 experts, first block dense) at ep=2 over 4 FSDP ranks: rank 0 keeps 8 experts per MoE layer,
    split again over the 2 ranks holding the same experts, and 1/4 of everything else."""
    a = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=64,
                  n_routed_experts=16, top_k=2, moe_ffn_dim=32, n_dense_layers=1, score_func="softmax")
    routed = routed_expert_params(a)
    rest = param_counts(a)["total"] - routed
    got = measure_rank_bytes(a, Layout(dp_shard=4, ep=2))
    assert got["n_params_local"] == rest // 4 + routed // 2 // 2


@pytest.mark.parametrize("argv", [
    ["--model", "deepseek-v3", "--count", "2048", "--ep", "64", "--pp", "16"],  # the published layout
    ["--model", "kimi-k2", "--count", "4096", "--pp", "16", "--tp", "1", "--global-batch", "16384"],
], ids=["deepseek-v3-2048", "kimi-k2-4096"])
def test_plan_verify_builds_trillion_parameter_moe_layouts(argv, capsys):
    """`zili plan --verify` builds the real MLA + MoE model for rank 0 of thousands of fake ranks (pipeline, FSDP
    and expert parallel) and its measured bytes agree with the planner's."""
    main(["plan", *argv, "--chip", "h800", "--verify", "--json"])
    layouts = json.loads(capsys.readouterr().out)["layouts"]
    # the best layout zili's trainer can build is the one verified: those ranked above it, it cannot
    index = next(i for i, r in enumerate(layouts) if "verify" in r)
    args = load_model(argv[1])[0]
    assert all(trainer_problem(Layout(**{k: r[k] for k in LAYOUT_KEYS}), args) for r in layouts[:index])
    verify = layouts[index]["verify"]
    assert verify["world_size"] == int(argv[3])
    assert abs(verify["measured_bytes"] / verify["analytic_bytes"] - 1) < 0.05


def test_verify_refuses_when_no_feasible_layout_can_be_built(capsys):
    """Qwen3's q/k-norm attention has no tensor-parallel plan in zili: with tp fixed at 2 nothing the planner
    finds can be built, and --verify says so in one line (exit 2) instead of measuring another layout."""
    with pytest.raises(SystemExit) as stop:
        main(["plan", "--model", "qwen3-0.6b", "--chip", "h100-sxm", "--count", "8", "--tp", "2", "--verify"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none of the feasible layouts" in err and "tp=1" in err
