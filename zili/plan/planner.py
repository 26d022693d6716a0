"""`zili plan`: put the inputs together, search, optionally verify on the real model code, return the plan.

`make_plan(...)` returns a dict (see zili.plan.report): model, cluster, tokens, layouts (best first),
infeasible (reason -> count), evaluated, assumptions, and `advice` in budget mode. It raises UserError
when no layout can run (with the reason when a single layout was asked for).
"""

from __future__ import annotations

from dataclasses import asdict

from zili.errors import UserError
from zili.models.flops import moe_layers, param_counts, routed_expert_params
from zili.plan import budget, cost, memory
from zili.plan.layout import LAYOUT_KEYS, Layout
from zili.plan.search import search
from zili.plan.spec import DEFAULT_SEQ_LEN, Arch, Cluster


def _model_info(name: str, arch: Arch) -> dict:
    counts = param_counts(arch)
    idle = 0
    if arch.is_moe:  # routed experts a token does not visit
        per_expert = routed_expert_params(arch) // arch.n_routed_experts
        idle = moe_layers(arch) * (arch.n_routed_experts - arch.top_k) * per_expert
    active = counts["total"] - idle
    return {"name": name, **asdict(arch), "params": counts["total"], "active_params": active}


def _assumptions(cluster: Cluster) -> dict:
    from zili.plan.search import USABLE_HBM

    given = "matmul_efficiency" in cluster.row
    return {"matmul_efficiency": cost.matmul_efficiency(cluster),
            "calibration": "the chip row's matmul_efficiency" if given else "uncalibrated default for this chip",
            "link_efficiency": cost.LINK_EFFICIENCY, "usable_hbm_fraction": USABLE_HBM,
            "traffic_per_activation_byte": cost.TRAFFIC_PER_ACTIVATION_BYTE}


def _verify(arch: Arch, model_args, result: dict) -> dict:
    """Measure rank 0's persistent bytes on the real model (fake process group) next to the analytic ones."""
    if arch.mlp != "swiglu" or arch.is_moe:
        raise UserError("--verify builds zili's own model, which has SwiGLU MLPs and no experts — drop --verify "
                        "for GELU or mixture-of-experts models")
    layout = Layout(**{k: result[k] for k in LAYOUT_KEYS})
    if layout.cp > 1 or layout.ep > 1 or (layout.zero != 3 and layout.shard_group > 1):
        raise UserError("--verify builds zili's layouts: FSDP2 (zero 3), tp, pp, dp — set --cp 1 --ep 1 --zero 3")
    from zili.parallel.mesh import ParallelDims
    from zili.plan.verify import measure_rank_bytes

    dims = ParallelDims(pp=layout.pp, dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp)
    measured = measure_rank_bytes(model_args, dims, stages_per_rank=layout.vpp,
                                  sequence_parallel=layout.sequence_parallel,
                                  activation_checkpointing=layout.recompute != "none")
    analytic = memory.weight_bytes(arch, layout, "first")
    return {"rank": 0, "world_size": measured["world_size"], "stage_ids": measured["stage_ids"],
            "measured_bytes": measured["params"] + measured["grads"] + measured["optimizer"],
            "analytic_bytes": analytic["params"] + analytic["grads"] + analytic["optimizer"],
            "measured": {k: measured[k] for k in ("params", "grads", "optimizer")},
            "analytic": {k: analytic[k] for k in ("params", "grads", "optimizer")}}


def make_plan(model_name: str, arch: Arch | None, cluster: Cluster, fixed: dict, global_batch: int | None,
              tokens: float | None, top: int = 5, verify: bool = False, model_args=None,
              budget_chip_hours: float | None = None, seq_len: int | None = None) -> dict:
    """The plan for `arch` on `cluster`, or with `budget_chip_hours` (and arch None) for the compute-optimal
    model at `seq_len` tokens per sequence."""
    advice = None
    if budget_chip_hours:
        peak = cluster.peak_flops(fixed.get("dtype") or ("bf16" if cluster.row.get("bf16_tflops") else "fp16"))
        arch, tokens, mfu = budget.propose(
            budget_chip_hours, peak, seq_len or DEFAULT_SEQ_LEN,
            lambda a, t: search(a, cluster, fixed, global_batch, t, 1)["layouts"])
        model_name = f"compute-optimal-{param_counts(arch)['total'] / 1e9:.3g}b"
        model_args = None
        advice = (f"compute-optimal for {budget_chip_hours:.3g} chip-hours (Chinchilla: N = sqrt(C / 120), D about "
                  f"20 N, the tokens spending the budget) at "
                  f"MFU {mfu:.1%}: {param_counts(arch)['total'] / 1e9:.3g} B parameters (n_layers {arch.n_layers}, "
                  f"dim {arch.dim}, n_heads {arch.n_heads}, n_kv_heads {arch.n_kv_heads}, ffn_dim {arch.ffn_dim}) "
                  f"on {tokens / 1e9:.3g} B tokens")
    if tokens is None:
        tokens = budget.TOKENS_PER_PARAM * param_counts(arch)["total"]
    found = search(arch, cluster, fixed, global_batch, tokens, top)
    if not found["layouts"]:
        if found["rejected"] and len(found["infeasible"]) == 1 and found["evaluated"] == 1:
            raise UserError(f"layout {Layout(**{k: found['rejected'][0][k] for k in LAYOUT_KEYS}).describe()} "
                            f"cannot run: {found['rejected'][0]['infeasible']}")
        top = max(found["infeasible"].values(), key=lambda e: e["count"])
        raise UserError(f"none of the {found['evaluated']} layouts can run; most often ({top['count']}x): "
                        f"{top['example']}")
    plan = {"model": _model_info(model_name, arch),
            "cluster": {"chip": cluster.chip, "count": cluster.count, "per_node": cluster.per_node,
                        "peak_tflops": cluster.peak_flops(found["layouts"][0]["dtype"]) / 1e12,
                        "hbm_gb": cluster.row["hbm_gb"]},
            "tokens": tokens, **found, "assumptions": _assumptions(cluster)}
    plan.pop("rejected")
    if advice:
        plan["advice"] = advice
    if verify:
        if model_args is None:
            from zili.models.args import ModelArgs

            model_args = ModelArgs(n_layers=arch.n_layers, dim=arch.dim, n_heads=arch.n_heads,
                                   n_kv_heads=arch.n_kv_heads, ffn_dim=arch.ffn_dim, vocab_size=arch.vocab_size,
                                   tied_embeddings=arch.tied_embeddings, qkv_bias=arch.qkv_bias,
                                   max_seq_len=arch.seq_len)
        plan["layouts"][0]["verify"] = _verify(arch, model_args, plan["layouts"][0])
    return plan
