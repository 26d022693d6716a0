"""`zili plan`: put the inputs together, search, optionally verify on the real model code, return the plan.

`make_plan(PlanRequest(...))` returns a dict (see zili.plan.report): model, cluster, tokens, layouts (best
first; each one's `time` a `zili.plan.cost.StepTime`), infeasible (reason -> count), evaluated, assumptions, and
`advice` in budget mode. It raises UserError when no layout can run (with the reason when a single layout was
asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.flops import moe_layers, param_counts, routed_expert_params
from zili.parallel.layout import Layout, trainer_problem
from zili.plan import budget, cost, memory
from zili.plan.calibrate import constants
from zili.plan.search import USABLE_HBM, search
from zili.plan.spec import DEFAULT_SEQ_LEN, MODEL_KEYS, Cluster

LAYOUT_KEYS = tuple(f.name for f in fields(Layout))


@dataclass(frozen=True)
class PlanRequest:
    """What `zili plan` is asked: a model (or, with `budget_chip_hours`, a budget to propose one for), the
    cluster, and the layout values the user fixed."""

    cluster: Cluster
    model_name: str = ""  # the preset or model file, for the report ("" in budget mode)
    args: ModelArgs | None = None  # None in budget mode
    seq_len: int | None = None  # tokens per sequence; required with `args`; budget mode: DEFAULT_SEQ_LEN if None
    fixed: dict = field(default_factory=dict)  # Layout field -> value; the others are searched
    global_batch: int | None = None  # sequences per step; None: about 4 M tokens per layout
    tokens: float | None = None  # training tokens; None: budget.TOKENS_PER_PARAM x parameters
    top: int = 5  # layouts to return
    verify: bool = False  # measure the best layout's persistent bytes on the real model
    budget_chip_hours: float | None = None  # propose the compute-optimal model for this budget instead of `args`
    moe_imbalance: float = 1.0  # busiest expert rank's routed tokens / the mean (zili.plan.cost.Step)


def _model_info(name: str, args: ModelArgs, seq_len: int) -> dict:
    counts = param_counts(args)
    idle = 0
    if args.is_moe:  # routed experts a token does not visit
        per_expert = routed_expert_params(args) // args.n_routed_experts
        idle = moe_layers(args) * (args.n_routed_experts - args.top_k) * per_expert
    active = counts["total"] - idle
    keys = {k: seq_len if k == "seq_len" else getattr(args, k) for k in MODEL_KEYS}
    return {"name": name, **keys, "params": counts["total"], "active_params": active}


def _assumptions(cluster: Cluster, moe_imbalance: float) -> dict:
    table = constants(cluster, moe_imbalance)
    return {"matmul_efficiency": cost.matmul_efficiency(cluster), "calibration": table[0]["origin"],
            "held_out": table[0]["held_out"], "link_efficiency": cost.LINK_EFFICIENCY,
            "usable_hbm_fraction": USABLE_HBM, "traffic_per_activation_byte": cost.TRAFFIC_PER_ACTIVATION_BYTE,
            "moe_imbalance": moe_imbalance, "constants": table}


def _built_layout(result: dict) -> Layout:
    """The layout zili's trainer builds for a planned one: persistent bytes do not depend on what is recomputed,
    and zili's trainer recomputes whole blocks."""
    layout = Layout(**{k: result[k] for k in LAYOUT_KEYS})
    return replace(layout, recompute="none" if layout.recompute == "none" else "full")


def _build_problem(args: ModelArgs, result: dict) -> str | None:
    return trainer_problem(_built_layout(result), args)


def _buildable(args: ModelArgs, layouts: list[dict]) -> int | None:
    """Index of the best of `layouts` that zili's own trainer can build (None if none can)."""
    return next((i for i, r in enumerate(layouts) if _build_problem(args, r) is None), None)


def _verify(args: ModelArgs, result: dict) -> dict:
    """Measure rank 0's persistent bytes on the real model (fake process group) next to the analytic ones."""
    # torch.distributed and the model code take over a second to import: only --verify pays for them
    from zili.plan.verify import measure_rank_bytes

    layout = Layout(**{k: result[k] for k in LAYOUT_KEYS})
    measured = measure_rank_bytes(args, _built_layout(result))
    analytic = memory.weight_bytes(args, layout, "first")
    return {"rank": 0, "world_size": measured["world_size"], "stage_ids": measured["stage_ids"],
            "measured_bytes": measured["params"] + measured["grads"] + measured["optimizer"],
            "analytic_bytes": analytic["params"] + analytic["grads"] + analytic["optimizer"],
            "measured": {k: measured[k] for k in ("params", "grads", "optimizer")},
            "analytic": {k: analytic[k] for k in ("params", "grads", "optimizer")}}


def _propose(request: PlanRequest, seq_len: int) -> tuple[ModelArgs, float, str]:
    """Budget mode: the compute-optimal model, its tokens and the advice line."""
    cluster, fixed, hours = request.cluster, request.fixed, request.budget_chip_hours
    peak = cluster.peak_flops(fixed.get("dtype") or ("bf16" if cluster.row.get("bf16_tflops") else "fp16"))
    args, tokens, mfu = budget.propose(
        hours, peak, seq_len, lambda a, t: search(a, cluster, fixed, seq_len=seq_len,
                                                  global_batch=request.global_batch, tokens=t, top=1)["layouts"])
    size = param_counts(args)["total"] / 1e9
    advice = (f"compute-optimal for {hours:.3g} chip-hours (Chinchilla: N = sqrt(C / 120), D about "
              f"20 N, the tokens spending the budget) at MFU {mfu:.1%}: {size:.3g} B parameters (n_layers "
              f"{args.n_layers}, dim {args.dim}, n_heads {args.n_heads}, n_kv_heads {args.n_kv_heads}, ffn_dim "
              f"{args.ffn_dim}) on {tokens / 1e9:.3g} B tokens")
    return args, tokens, advice


def make_plan(request: PlanRequest) -> dict:
    """The plan for `request.args` on `request.cluster`, or in budget mode for the compute-optimal model."""
    cluster, args, name, tokens, advice = request.cluster, request.args, request.model_name, request.tokens, None
    seq_len = request.seq_len
    if request.budget_chip_hours:
        seq_len = seq_len or DEFAULT_SEQ_LEN
        args, tokens, advice = _propose(request, seq_len)
        name = f"compute-optimal-{param_counts(args)['total'] / 1e9:.3g}b"
    if args is None or seq_len is None:
        raise ValueError("PlanRequest needs args and seq_len, or budget_chip_hours")
    if tokens is None:
        tokens = budget.TOKENS_PER_PARAM * param_counts(args)["total"]
    found = search(args, cluster, request.fixed, seq_len=seq_len, global_batch=request.global_batch,
                   tokens=tokens, top=None if request.verify else request.top,
                   moe_imbalance=request.moe_imbalance)
    verified = _buildable(args, found["layouts"]) if request.verify else None
    if request.verify:  # the shown layouts, and the one verified if it ranks below them
        found["layouts"] = found["layouts"][:request.top] + (
            [found["layouts"][verified]] if verified is not None and verified >= request.top else [])
    if not found["layouts"]:
        if found["rejected"] and len(found["infeasible"]) == 1 and found["evaluated"] == 1:
            raise UserError(f"layout {Layout(**{k: found['rejected'][0][k] for k in LAYOUT_KEYS}).describe()} "
                            f"cannot run: {found['rejected'][0]['infeasible']}")
        top = max(found["infeasible"].values(), key=lambda e: e["count"])
        raise UserError(f"none of the {found['evaluated']} layouts can run; most often ({top['count']}x): "
                        f"{top['example']}")
    plan = {"model": _model_info(name, args, seq_len),
            "cluster": {"chip": cluster.chip, "count": cluster.count, "per_node": cluster.per_node,
                        "peak_tflops": cluster.peak_flops(found["layouts"][0]["dtype"]) / 1e12,
                        "hbm_gb": cluster.row["hbm_gb"]},
            "tokens": tokens, **found, "assumptions": _assumptions(cluster, request.moe_imbalance)}
    plan.pop("rejected")
    if advice:
        plan["advice"] = advice
    if request.verify:
        if verified is None:
            raise UserError("--verify builds a layout with zili's own model and trainer, and none of the feasible "
                            f"layouts can run there: {_build_problem(args, plan['layouts'][0])}")
        shown = plan["layouts"][min(verified, request.top)]
        shown["verify"] = _verify(args, shown)
    return plan
