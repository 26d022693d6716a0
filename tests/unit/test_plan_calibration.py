"""`zili plan` beyond its fitting set: per-chip calibration (H100 fitted on MosaicML's single-node runs), the
held-out published runs by source (dense and MoE), `--calibrate BENCH.json`, and the MoE / context-parallel
terms (node-limited all-to-all, imbalance, K/V all-gather, per-rank expert bytes, ep and cp searched)."""

from __future__ import annotations

import json
import statistics
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_plan import plan_json, user_error
from zili.accel import load_chips
from zili.bench.workloads import WORKLOADS
from zili.cli import main
from zili.models.args import ModelArgs
from zili.parallel.layout import Layout
from zili.plan import cost, memory
from zili.plan.published import held_out_summary, mpt_sweep_runs, predict
from zili.plan.spec import load_cluster, load_model

DATA = Path(__file__).parents[1] / "data" / "planner"
HELD_OUT = tomllib.loads((DATA / "heldout_runs.toml").read_text())["run"]


def a100_held_out() -> list[dict]:
    """The published_runs.toml rows not used to fit the A100 efficiency (BLOOM, MosaicML MPT), by source."""
    rows = tomllib.loads((DATA / "published_runs.toml").read_text())["run"]
    return [dict(r, group="BLOOM-176B" if r["name"].startswith("bloom") else "MosaicML MPT")
            for r in rows if r["name"].startswith(("bloom", "mpt-"))]


@pytest.fixture(scope="module")
def predictions(tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("runs")
    return [predict(run, work) for run in HELD_OUT + a100_held_out()]


def test_h100_efficiency_zeroes_the_error_of_its_fitting_runs(tmp_path):
    fit = [r for r in mpt_sweep_runs(DATA / "mosaicml_mpt_h100_80gb.csv", chip="h100-sxm") if r["count"] == 8]
    errors = [predict(r, tmp_path)["error"] for r in fit]
    assert len(fit) == 4 and abs(statistics.mean(errors)) < 0.01, errors
    assert load_chips()["h800"]["matmul_efficiency"] == load_chips()["h100-sxm"]["matmul_efficiency"]


def test_held_out_rows_are_not_fitting_rows():
    fitting = {json.dumps(r["model"], sort_keys=True) for r in mpt_sweep_runs(DATA / "mosaicml_mpt_h100_80gb.csv")}
    assert all(r.get("preset") or json.dumps(r["model"], sort_keys=True) not in fitting for r in HELD_OUT)
    assert {r["group"] for r in HELD_OUT} >= {"torchtitan H100", "Megatron-Core MoE H100"}
    assert all(r["source"] and r["kind"] in ("dense", "moe") for r in HELD_OUT)


def test_chip_rows_report_the_held_out_errors_they_have(predictions):
    """Each calibrated chip row's `held_out` is what the held-out runs give today, by source."""
    for chip in ("h100-sxm", "h800", "a100-80gb"):
        assert load_chips()[chip]["held_out"] == held_out_summary(predictions, chip), chip


def test_held_out_medians(predictions):
    """Acceptance figures (docs/planner.md, Held-out runs): dense runs from other sources than the fitting sets,
    median |error| <= 10 %; MoE runs (the bf16 Megatron-Core ones and DeepSeek-V3 in fp8), none of them used to
    fit anything, median |error| <= 15 %."""
    dense = [abs(p["error"]) for p in predictions if p["kind"] == "dense"]
    moe = [abs(p["error"]) for p in predictions if p["kind"] == "moe"]
    assert len(dense) == 13 and statistics.median(dense) <= 0.10
    assert len(moe) == 5 and statistics.median(moe) <= 0.15


def test_all_to_all_exposed_zeroes_the_error_of_its_fitting_runs(tmp_path):
    """The H100's `all_to_all_exposed` is fitted on NeMo AutoModel's MoE runs (moe_fitting_runs.toml): mean signed
    error 0 there; every MoE row of heldout_runs.toml is from another source; the H800 takes the H100's."""
    fit = tomllib.loads((DATA / "moe_fitting_runs.toml").read_text())["run"]
    errors = [predict(r, tmp_path)["error"] for r in fit]
    assert len(fit) == 4 and abs(statistics.mean(errors)) < 0.01, errors
    assert {r["group"] for r in fit}.isdisjoint({r["group"] for r in HELD_OUT if r["kind"] == "moe"})
    assert {r["name"] for r in fit}.isdisjoint({r["name"] for r in HELD_OUT})
    chips = load_chips()
    assert chips["h800"]["all_to_all_exposed"] == chips["h100-sxm"]["all_to_all_exposed"] < 1
    # without it (every all-to-all exposed) the same runs are planned slower
    unfitted = [predict(dict(r, chip_overrides={"all_to_all_exposed": 1.0}), tmp_path)["error"] for r in fit]
    assert all(u > e for u, e in zip(unfitted, errors))


def test_a_ring_across_nodes_moves_one_nic_per_local_rank():
    """A ring collective over whole nodes runs at (its ranks per node) x one NIC, at most the scale-up link; a
    group with one rank per node gets one NIC; inside a node, the scale-up link."""
    h100 = load_cluster("h100-sxm", 64, 8)
    nic, up = 50e9 * cost.LINK_EFFICIENCY, 450e9 * cost.LINK_EFFICIENCY
    assert cost.link_bandwidth(h100, stride=1, size=8) == up
    assert cost.link_bandwidth(h100, stride=1, size=64) == 8 * nic  # 8 NICs: 400 GB/s, under NVLink's 450
    fast_nics = replace(h100, row={**h100.row, "scale_out_gbps": 100})
    assert cost.link_bandwidth(fast_nics, stride=1, size=64) == up
    assert cost.link_bandwidth(h100, stride=2, size=32) == 4 * nic
    assert cost.link_bandwidth(h100, stride=8, size=8) == nic


def _bench_result(step_s: float) -> dict:
    w = WORKLOADS["dense-125m"]
    return {"device": "NVIDIA H100 80GB HBM3", "chip": "h100-sxm", "workload": w.name, "batch": w.batch,
            "seq_len": w.seq_len, "dtype": "bf16", "step_s": step_s, "tokens_per_s": w.batch * w.seq_len / step_s}


def test_calibrate_replaces_the_efficiency_and_reproduces_the_bench_step(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench_result(0.25)))
    flags = ["--model", "llama3-8b", "--chip", "h100-sxm", "--count", 8, "--dp-shard", 8, "--microbatch", 1,
             "--recompute", "full", "--global-batch", 64]
    before = plan_json(capsys, *flags)
    after = plan_json(capsys, *flags, "--calibrate", bench)
    eff = after["assumptions"]["matmul_efficiency"]
    assert eff != before["assumptions"]["matmul_efficiency"] and 0 < eff < 1
    assert str(bench) in after["assumptions"]["calibration"] and after["assumptions"]["held_out"] == ""
    t0, t1 = before["layouts"][0]["time"], after["layouts"][0]["time"]
    elementwise = t0["compute_s"] - (t0["compute_s"] - t1["compute_s"]) / (1 - 0.49 / eff)
    assert t1["compute_s"] - elementwise == pytest.approx((t0["compute_s"] - elementwise) * 0.49 / eff, rel=1e-6)
    # planning the bench run itself with the calibrated chip gives the measured step time
    w = WORKLOADS["dense-125m"]
    model = tmp_path / "w.toml"
    model.write_text("".join(f"{k} = {getattr(w.args, k)}\n" for k in ("n_layers", "dim", "n_heads", "n_kv_heads",
                                                                      "ffn_dim", "vocab_size")) + "seq_len = 2048\n")
    one = plan_json(capsys, "--model", model, "--chip", "h100-sxm", "--count", 1, "--microbatch", w.batch,
                    "--recompute", "none", "--global-batch", w.batch, "--calibrate", bench)
    assert one["layouts"][0]["step_s"] == pytest.approx(0.25, rel=1e-9)
    table = main(["plan", *map(str, flags), "--calibrate", str(bench)]) or capsys.readouterr().out
    assert "measured by zili bench" in table and "traffic_per_activation_byte" in table


@pytest.mark.parametrize("change, fragment", [
    ({"chip": "a100-80gb"}, "measured on a100-80gb"),
    ({"dtype": "fp32"}, "--dtype bf16"),
    ({"step_s": 1e-6}, "faster than"),
    ({"workload": "nope"}, "unknown bench workload"),
    (None, "not a `zili bench --json` result"),
])
def test_calibrate_refuses_what_it_cannot_use(tmp_path, capsys, change, fragment):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({**_bench_result(0.25), **change}) if change else '{"chip": "h100-sxm"}')
    assert fragment in user_error(capsys, "--model", "llama3-8b", "--chip", "h100-sxm", "--count", 8,
                                  "--calibrate", bench)


def _step(args, layout, *, count, seq_len=4096, imbalance=1.0, batch=None):
    cluster = load_cluster("h800", count, 8)
    return cost.Step(args=args, seq_len=seq_len, layout=layout, cluster=cluster,
                     global_batch=batch or layout.dp * layout.microbatch * 16, moe_imbalance=imbalance)


def test_node_limited_routing_cuts_the_scale_out_all_to_all():
    args, _ = load_model("deepseek-v3")
    layout = Layout(pp=16, ep=64, dp_shard=128, zero=1)
    limited = _step(args, layout, count=2048)
    free = _step(replace(args, topk_group=args.n_group), layout, count=2048)
    # 8 nodes: at most 4 of them per token, each remote with probability 7/8; unlimited: 8 copies x 7/8
    assert cost.moe_remote_share(limited) == pytest.approx(4 * 7 / 8 / 8)
    assert cost.moe_remote_share(free) == pytest.approx(7 / 8)
    assert cost.expert_time(limited) < cost.expert_time(free)
    inside = _step(args, replace(layout, ep=8), count=2048)
    assert cost.moe_remote_share(inside) == 0  # ep inside a node: scale-up links only


def test_imbalance_slows_experts_and_their_all_to_all():
    args, _ = load_model("deepseek-v3")
    layout = Layout(pp=16, ep=64, dp_shard=128, zero=1)
    even, skewed = _step(args, layout, count=2048), _step(args, layout, count=2048, imbalance=1.5)
    latency = cost.LATENCY_S * 4 * even.first_stage_layers * even.moe_share * cost.all_to_all_exposed(even.cluster)
    assert cost.expert_time(skewed) == pytest.approx(1.5 * (cost.expert_time(even) - latency) + latency)
    extra = cost.layer_flops(skewed).training - cost.layer_flops(even).training
    routed = even.moe_share * 2 * args.top_k * 3 * 7168 * 2048  # forward FLOPs per token in routed experts
    assert extra == pytest.approx(0.5 * 3 * routed)
    assert cost.step_time(skewed).step_s > cost.step_time(even).step_s


def test_context_parallel_gathers_kv_and_keeps_it():
    args, seq = load_model("llama3-8b", 32768)
    for cp in (2, 4):
        layout = Layout(cp=cp, dp_shard=8 // cp, recompute="none")
        step = _step(args, layout, count=8, seq_len=seq)
        gathered = seq * 2 * args.n_kv_heads * args.head_dim * 2  # the whole sequence's K and V, bytes
        per_pass = (cp - 1) / cp * gathered / step.bandwidth("cp", cp) + cost.LATENCY_S
        assert cost.context_time(step) == pytest.approx(args.n_layers * 2 * per_pass)
        base = replace(layout, cp=1)
        kept = memory.layer_activation_parts(args, layout, seq)[0]
        assert kept == pytest.approx(memory.layer_activation_parts(args, base, seq // cp)[0]
                                     + (seq - seq // cp) * 2 * args.n_kv_heads * args.head_dim * 2)


def test_context_parallel_gathers_the_latent_of_latent_attention():
    """MLA under cp: the trainer gathers the latent + shared rope key (512 + 64 values per token for DeepSeek-V3),
    not the expanded per-head K and V (128 x (192 + 128))."""
    args, seq = load_model("deepseek-v3", 16384)
    layout = Layout(cp=2, dp_shard=4, recompute="none")
    step = _step(args, layout, count=8, seq_len=seq)
    gathered = seq * (512 + 64) * 2
    per_pass = gathered / 2 / step.bandwidth("cp", 2) + cost.LATENCY_S
    assert cost.context_time(step) == pytest.approx(step.first_stage_layers * 2 * per_pass)


def test_expert_bytes_per_rank_under_ep():
    args = ModelArgs(n_layers=8, dim=1024, n_heads=8, n_kv_heads=8, ffn_dim=4096, vocab_size=1000,
                     n_routed_experts=16, top_k=2, moe_ffn_dim=512, n_dense_layers=0)
    expert = memory.stage_params(args, Layout(ep=1, dp_shard=16), "first")["expert"]
    for ep in (2, 4, 16):
        p = memory.stage_params(args, Layout(ep=ep, dp_shard=16), "first")
        assert p["expert"] == pytest.approx(expert / ep)
        z3 = memory.weight_bytes(args, Layout(ep=ep, dp_shard=16), "first")
        z1 = memory.weight_bytes(args, Layout(ep=ep, dp_shard=16, zero=1), "first")
        # optimizer state: experts over ep ranks, then sharded over the remaining 16 / ep ranks
        assert z3["optimizer"] == pytest.approx(8 * (p["dense"] / 16 + p["expert"] / (16 // ep)))
        assert z1["grads"] == pytest.approx(4 * (p["dense"] + p["expert"]))  # ZeRO-1: gradients unsharded


def test_ep_and_cp_are_searched(tmp_path, capsys):
    moe = tmp_path / "moe.toml"
    moe.write_text("n_layers = 8\ndim = 2048\nn_heads = 16\nn_kv_heads = 4\nffn_dim = 8192\nvocab_size = 32000\n"
                   "seq_len = 16384\nn_routed_experts = 16\ntop_k = 2\nmoe_ffn_dim = 1024\n")
    plan = plan_json(capsys, "--model", moe, "--chip", "h100-sxm", "--count", 16, "--tp", 1, "--pp", 1,
                     "--microbatch", 1, "--recompute", "full", "--dp-replicate", 1, "--top", 100)
    seen = {(r["ep"], r["cp"]) for r in plan["layouts"]}
    assert {e for e, _ in seen} == {1, 2, 4, 8, 16} and {c for _, c in seen} == {1, 2, 4}
    assert all(r["time"]["cp_comm_s"] > 0 for r in plan["layouts"] if r["cp"] > 1)
    assert "--moe-imbalance" in user_error(capsys, "--model", moe, "--chip", "h100-sxm", "--count", 16,
                                           "--moe-imbalance", 0.5)


def test_report_says_where_the_all_to_all_share_comes_from(capsys):
    """The plan names `all_to_all_exposed` with its fitting runs on a calibrated chip, and says it is the
    uncalibrated default (1: every all-to-all exposed) on another."""
    for chip, value, origin in (("h100-sxm", 0.51, "NeMo AutoModel"), ("a100-80gb", 1.0, "uncalibrated default")):
        plan = plan_json(capsys, "--model", "qwen3-30b-a3b", "--chip", chip, "--count", 16, "--ep", 8, "--top", 1)
        entry = next(c for c in plan["assumptions"]["constants"] if c["name"] == "all_to_all_exposed")
        assert entry["value"] == value and origin in entry["origin"], entry
