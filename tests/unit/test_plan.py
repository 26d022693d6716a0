"""`zili plan`: validated against published runs, its layout rules, memory and time model, JSON output,
compute-optimal advice and its one-line errors. Runs the CLI in-process (fast) except where a fresh process
is needed (--verify starts a fake process group)."""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path

import pytest

from zili.cli import main
from zili.models.args import ModelArgs
from zili.models.flops import param_counts
from zili.parallel.layout import Layout
from zili.plan import memory
from zili.plan.cost import Step, step_time
from zili.plan.published import mpt_sweep_runs, plan_args
from zili.plan.spec import load_cluster, load_model

RUNS = tomllib.loads((Path(__file__).parents[1] / "data" / "planner" / "published_runs.toml").read_text())
GIB = 2**30


def plan_json(capsys, *args) -> dict:
    main(["plan", *map(str, args), "--json"])
    return json.loads(capsys.readouterr().out)


def user_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["plan", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def split_model(values: dict) -> tuple[ModelArgs, int]:
    """A model file's keys -> (architecture, seq_len)."""
    values = dict(values)
    seq_len = values.pop("seq_len")
    return ModelArgs(**values), seq_len


def model_file(tmp_path, values: dict, name="model.toml") -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / name
    path.write_text("[model]\n" + "\n".join(lines) + "\n")
    return path


def test_step_time_matches_published_runs(tmp_path, capsys):
    errors = {}
    for run in RUNS["run"]:
        plan = plan_json(capsys, *plan_args(run, tmp_path))
        best = plan["layouts"][0]
        assert (best["tp"], best["pp"], best["dp_replicate"] * best["dp_shard"]) == (
            run["layout"]["tp"], run["layout"]["pp"], run["layout"]["dp"])
        errors[run["name"]] = best["step_s"] / run["measured"]["step_s"] - 1
    abs_errors = [abs(e) for e in errors.values()]
    assert len(errors) == len(RUNS["run"]) >= 26
    assert statistics.median(abs_errors) <= 0.10, errors
    assert max(abs_errors) <= 0.20, errors


@pytest.mark.parametrize("row", RUNS["memory"], ids=lambda r: r["name"])
def test_activation_memory_matches_korthikanti(row):
    run = next(r for r in RUNS["run"] if r["name"] == row["run"])
    args, seq_len = split_model(run["model"])
    lay = run["layout"]
    base = dict(tp=lay["tp"], pp=lay["pp"], vpp=lay["vpp"], dp_replicate=lay["dp"], microbatch=lay["microbatch"])
    none = Layout(**base, recompute="none", sequence_parallel=False, attention=lay["attention"])
    selective = Layout(**base, recompute="selective", sequence_parallel=True, attention=lay["attention"])
    for layout, key in ((none, "activations_gib_no_recompute"), (selective, "activations_gib_selective_sp")):
        got = memory.activation_bytes(args, layout, seq_len, lay["global_batch"], "first") / GIB
        assert got == pytest.approx(row["measured"][key], rel=0.10), (key, got)


def test_recompute_and_sharding_order_memory():
    args, seq_len = load_model("llama3-70b")
    acts = {rec: memory.activation_bytes(args, Layout(tp=8, pp=4, dp_shard=16, recompute=rec,
                                                      sequence_parallel=True), seq_len, 1024) for rec in
            ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] <= acts["none"]
    weights = [sum(memory.weight_bytes(args, Layout(tp=8, dp_shard=d), "first").values()) for d in (1, 4, 16)]
    assert weights[0] > weights[1] > weights[2]
    # ZeRO-3 over d ranks: 16 bytes per parameter / d (plus two gathered blocks)
    p = memory.stage_params(args, Layout(tp=8, dp_shard=16), "first")["dense"]
    w = memory.weight_bytes(args, Layout(tp=8, dp_shard=16), "first")
    assert w["params"] + w["grads"] + w["optimizer"] == pytest.approx(16 * p / 16)


def test_attention_kernel_and_dropout_change_memory_and_time():
    """A fused (flash) kernel stores no scores and does the causal half of the attention matmuls, with a
    backward of 2.5 forwards; materialized scores cost 5 a s^2 b bytes with dropout (2 without)."""
    base = dict(n_layers=24, dim=2048, n_heads=16, n_kv_heads=16, ffn_dim=8192, vocab_size=50368, mlp="gelu",
                tied_embeddings=True)
    a, s, b = 16, 8192, 2
    flash, eager = (Layout(dp_shard=8, microbatch=b, attention=k) for k in ("flash", "materialized"))
    for dropout, score_bytes in ((False, 2), (True, 5)):
        args = ModelArgs(**base, dropout=dropout)
        rest_f, scores_f = memory.layer_activation_parts(args, flash, s)
        rest_e, scores_e = memory.layer_activation_parts(args, eager, s)
        assert scores_f == 0 and scores_e == score_bytes * a * s * s * b and rest_f == rest_e
    assert memory.layer_activation_parts(ModelArgs(**base, dropout=True), flash, s)[0] == pytest.approx(
        memory.layer_activation_parts(ModelArgs(**base), flash, s)[0] + 2 * s * b * 2048)  # two 1-byte masks
    cluster = load_cluster("a100-80gb", 8, 8)
    args = ModelArgs(**base)
    hw = {k: step_time(Step(args=args, seq_len=s, layout=Layout(dp_shard=8, microbatch=b, attention=k),
                            cluster=cluster, global_batch=64)).hardware_flops for k in ("flash", "materialized")}
    attention = 64 * s * args.n_layers * 4.0 * s * args.dim  # forward attention FLOPs of the step, unmasked
    assert hw["materialized"] - hw["flash"] == pytest.approx(attention * (3 - 0.5 * 3.5))


def test_hbm_is_binary_gigabytes():
    assert load_cluster("a100-80gb", 8, 8).hbm_bytes == 80 * 2**30  # nvidia-smi: 81920 MiB


def test_primary_source_rows_are_the_sweep_rows_they_cite():
    """The MPT runs in published_runs.toml are exactly the sweep's rows at seq 2048 for models >= 1 B:
    same model, layout, chips and measured step."""
    sweep = mpt_sweep_runs(Path(__file__).parents[1] / "data" / "planner" / "mosaicml_mpt_a100_80gb.csv")
    assert len(sweep) == 61

    def key(r):
        return json.dumps([r["model"], r["layout"], r["count"], round(r["measured"]["step_s"], 3)], sort_keys=True)

    chosen = {key(r) for r in sweep if r["model"]["seq_len"] == 2048 and not r["model_size"].endswith("m")}
    assert {key(r) for r in RUNS["run"] if r["name"].startswith("mpt-")} == chosen and len(chosen) == 7


def test_pipeline_bubble_is_p_minus_1_over_v_m():
    args, seq_len = load_model("llama3-70b")
    cluster = load_cluster("h100-sxm", 64, 8)
    for vpp in (1, 2):
        layout = Layout(tp=8, pp=8, vpp=vpp, dp_shard=1, microbatch=1, recompute="full", sequence_parallel=True)
        t = step_time(Step(args=args, seq_len=seq_len, layout=layout, cluster=cluster, global_batch=32))
        assert t.microbatches == 32 and t.dp_comm_s == 0  # dp = 1: no gradient reduction
        busy = t.step_s - t.bubble_s
        assert t.bubble_s == pytest.approx(busy * 7 / (vpp * 32), rel=1e-9)


def test_every_flag_given_returns_that_layout_with_json_fields(capsys):
    plan = plan_json(capsys, "--model", "llama3-8b", "--chip", "h100-sxm", "--count", 16, "--tp", 2, "--pp", 2,
                     "--vpp", 2, "--cp", 1, "--ep", 1, "--dp-shard", 2, "--dp-replicate", 2, "--zero", 3,
                     "--microbatch", 2, "--recompute", "selective", "--sequence-parallel", "--dtype", "bf16",
                     "--attention", "materialized", "--global-batch", 64, "--tokens", "1T")
    assert len(plan["layouts"]) == 1
    got = plan["layouts"][0]
    assert {k: got[k] for k in ("tp", "pp", "vpp", "cp", "ep", "dp_shard", "dp_replicate", "microbatch",
                                "recompute", "attention")} == dict(tp=2, pp=2, vpp=2, cp=1, ep=1, dp_shard=2,
                                                                   dp_replicate=2, microbatch=2,
                                                                   recompute="selective", attention="materialized")
    for key in ("mem_gb", "step_s", "tflops_per_device", "mfu", "tokens_per_s", "days"):
        assert got[key] > 0
    assert got["tokens_per_s"] == pytest.approx(64 * 4096 / got["step_s"])
    assert got["days"] == pytest.approx(1e12 / got["tokens_per_s"] / 86400)
    assert 0 < got["mfu"] < 1 and got["hardware_tflops_per_device"] > got["tflops_per_device"]


def test_search_ranks_by_mfu_and_reports_infeasible(capsys):
    plan = plan_json(capsys, "--model", "llama3-70b", "--chip", "a100-80gb", "--count", 64, "--top", 3)
    mfus = [r["mfu"] for r in plan["layouts"]]
    assert mfus == sorted(mfus, reverse=True) and len(mfus) == 3
    assert all(r["mem_gb"] <= 80 * 2**30 / 1e9 * 0.9 for r in plan["layouts"])  # 80 GiB, 90 % usable
    assert any("GB per chip" in why for why in plan["infeasible"])
    # e.g. no sharding at all does not fit
    assert all(e["count"] >= 1 and e["example"] for e in plan["infeasible"].values())


def test_moe_model_file(tmp_path, capsys):
    values = dict(n_layers=8, dim=2048, n_heads=16, n_kv_heads=4, ffn_dim=8192, vocab_size=32000, seq_len=4096,
                  n_routed_experts=16, n_shared_experts=1, top_k=2, moe_ffn_dim=1024, n_dense_layers=1)
    plan = plan_json(capsys, "--model", model_file(tmp_path, values), "--chip", "h100-sxm", "--count", 16,
                     "--ep", 4)
    assert plan["model"]["active_params"] < plan["model"]["params"]
    assert plan["layouts"][0]["ep"] == 4 and plan["layouts"][0]["time"]["ep_comm_s"] > 0


def test_budget_gives_compute_optimal_model(capsys):
    plan = plan_json(capsys, "--budget-chip-hours", 1e6, "--chip", "h100-sxm", "--count", 1024)
    best, n = plan["layouts"][0], plan["model"]["params"]
    # N = sqrt(C / 120) at the best layout's MFU, up to the shape grid's step (dim a multiple of 1,024)
    assert n == pytest.approx((1e6 * 3600 * 989e12 * best["mfu"] / 120) ** 0.5, rel=0.06)
    # D = 20 N: D / N goes as 1 / N^2 for a fixed budget, so the grid's 6 % is 12 % here, plus the attention
    assert plan["tokens"] / n == pytest.approx(20, rel=0.15)
    budget = 1e6 * 3600 * 989e12 * best["mfu"]  # FLOPs the chips deliver at the planned MFU
    assert 6 * n * plan["tokens"] == pytest.approx(budget, rel=0.25)
    assert best["chip_hours"] == pytest.approx(1e6, rel=0.01)  # the tokens spend the budget
    assert "compute-optimal" in plan["advice"]


@pytest.mark.parametrize("args, fragment", [
    (["--model", "llama3-70b", "--chip", "a100-80gb", "--count", 64, "--tp", 3], "tp=3 does not divide"),
    (["--model", "llama3-8b", "--chip", "h100-sxm", "--count", 8, "--per-node", 4, "--tp", 8], "keep tp within a node"),
    (["--model", "dense-1t", "--chip", "a100-80gb", "--count", 3072, "--tp", 8, "--pp", 64, "--dp-replicate", 6,
      "--dp-shard", 1, "--vpp", 1, "--cp", 1, "--ep", 1, "--zero", 3, "--microbatch", 1, "--recompute", "none",
      "--sequence-parallel", "--dtype", "bf16"], "GB per chip"),
    (["--model", "llama3-8b", "--chip", "no-such-chip", "--count", 8], "no-such-chip"),
    (["--model", "llama3-8b", "--chip", "h100-sxm", "--count", 8, "--tokens", "lots"], "--tokens"),
    (["--chip", "h100-sxm", "--count", 8], "--model"),
])
def test_impossible_requests_are_one_line_exit_2(capsys, args, fragment):
    assert fragment in user_error(capsys, *args)


@pytest.mark.parametrize("change, fragment", [
    ({"dim": None}, "missing dim"),
    ({"n_layers": -4}, "n_layers must be positive"),
    ({"mlp": "relu"}, "mlp must be"),
    ({"n_routed_experts": -1}, "n_routed_experts must be"),
])
def test_bad_model_file(tmp_path, capsys, change, fragment):
    values = dict(n_layers=4, dim=512, n_heads=8, n_kv_heads=8, ffn_dim=2048, vocab_size=1000, seq_len=1024)
    values.update(change)
    values = {k: v for k, v in values.items() if v is not None}
    err = user_error(capsys, "--model", model_file(tmp_path, values), "--chip", "h100-sxm", "--count", 8)
    assert fragment in err


@pytest.mark.parametrize("text, fragment", [
    ("bf16_tflops = 100.0\nfp16_tflops = 100.0\nhbm_gb = 32\nscale_up_gbps = 100\n", "missing scale_out_gbps"),
    ("bf16_tflops = 100.0\nfp16_tflops = 100.0\nhbm_gb = -32\nscale_up_gbps = 100\nscale_out_gbps = 10\n",
     "hbm_gb must be"),
])
def test_bad_chip_file(tmp_path, capsys, text, fragment):
    (tmp_path / "chip.toml").write_text(text)
    assert fragment in user_error(capsys, "--model", "llama3-8b", "--chip", tmp_path / "chip.toml", "--count", 8)


def test_chip_file_plans_like_its_table_row(tmp_path, capsys):
    (tmp_path / "chip.toml").write_text("[chip.my-a100]\nbf16_tflops = 312.0\nfp16_tflops = 312.0\nhbm_gb = 80\n"
                                        "hbm_tbps = 2.039\nscale_up_gbps = 600\nscale_out_gbps = 25\n"
                                        "matmul_efficiency = 0.70\n")
    flags = ["--model", "llama3-8b", "--count", 16, "--tp", 2, "--global-batch", 64]
    a = plan_json(capsys, *flags, "--chip", tmp_path / "chip.toml")["layouts"][0]
    b = plan_json(capsys, *flags, "--chip", "a100-80gb")["layouts"][0]
    assert a["step_s"] == pytest.approx(b["step_s"]) and a["mem_gb"] == pytest.approx(b["mem_gb"])


def test_dense_1t_preset_size():
    assert param_counts(load_model("dense-1t")[0])["total"] == pytest.approx(1.0e12, rel=0.02)


def test_verify_dense_1t_on_3072_fake_ranks(zili_cli):
    proc = zili_cli("plan", "--model", "dense-1t", "--chip", "a100-80gb", "--count", 3072, "--tp", 8, "--pp", 64,
                    "--dp-replicate", 6, "--verify", "--json", check=True)
    best = json.loads(proc.stdout)["layouts"][0]
    assert (best["tp"], best["pp"], best["dp_replicate"], best["dp_shard"]) == (8, 64, 6, 1)
    v = best["verify"]
    assert v["world_size"] == 3072 and 0 in v["stage_ids"]
    assert v["measured_bytes"] == pytest.approx(v["analytic_bytes"], rel=0.05)
    # stage 0 of dense-1t under tp 8 holds ~2.4 B parameters at 16 bytes each (no dp sharding)
    assert v["measured_bytes"] > 30e9
