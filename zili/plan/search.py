"""Evaluate layouts and search the ones left open.

`evaluate` gives one layout's memory, step time and throughput (or why it cannot run); `search` tries every
combination of the layout values the user did not fix and ranks the feasible ones by MFU (all layouts use
the same chips, so MFU orders them as tokens/s does).

Searched values: tp in the powers of two up to a node; pp among the divisors of the chip count up to the
layer count; vpp 1, 2, 4 (pp > 1); cp 1, 2, 4 (only for sequences of 16k tokens or more); ep among the
divisors of the expert count; dp_replicate among the divisors of what is left (dp_shard takes the rest);
microbatch 1, 2, 4, 8; recompute none, selective, full; sequence parallelism on whenever tp > 1; zero 3
(zili's FSDP2); dtype bf16 (fp16 where the chip has no bf16); attention "flash" (zili's SDPA) unless fixed.
"""

from __future__ import annotations

import itertools
import re

from zili.models import flops
from zili.models.args import ModelArgs
from zili.parallel.layout import Layout, problem
from zili.plan import memory
from zili.plan.cost import Step, step_time
from zili.plan.spec import Cluster

USABLE_HBM = 0.9  # fraction of HBM a plan may fill: the rest is allocator fragmentation, NCCL and runtime buffers
DEFAULT_BATCH_TOKENS = 4 * 2**20  # global batch when none is given: about 4 M tokens


def default_global_batch(layout: Layout, seq_len: int) -> int:
    """About DEFAULT_BATCH_TOKENS tokens in sequences of `seq_len`, a multiple of dp x microbatch, at least pp
    micro-batches."""
    unit = layout.dp * layout.microbatch
    per_unit = max(1, round(DEFAULT_BATCH_TOKENS / seq_len / unit))
    return unit * max(per_unit, layout.pp)


def _batch_too_large(seq_len: int, batch: int) -> str | None:
    """Without --global-batch, a layout whose smallest batch is over twice the default is not considered:
    the batch size is a training choice, and comparing layouts at very different batches would be unfair."""
    if batch * seq_len > 2 * DEFAULT_BATCH_TOKENS:
        return (f"its smallest global batch is {batch} sequences ({batch * seq_len / 2**20:.0f} M tokens), over "
                f"twice the default {DEFAULT_BATCH_TOKENS / 2**20:.0f} M — give --global-batch to allow it, or use "
                "more tp/pp/cp and less data parallelism")
    return None


def layout_problem(args: ModelArgs, cluster: Cluster, layout: Layout, seq_len: int, batch: int) -> str | None:
    """Why `layout` cannot run `args` on `cluster`: the shared rules, then the cluster's (None if it can)."""
    return (problem(layout, args, world_size=cluster.count, seq_len=seq_len, global_batch=batch)
            or cluster.layout_problem(layout))


def evaluate(args: ModelArgs, cluster: Cluster, layout: Layout, *, seq_len: int, global_batch: int | None,
             tokens: float, moe_imbalance: float = 1.0) -> dict:
    """One layout's figures for `global_batch` sequences of `seq_len` tokens (None: the default batch), the
    busiest expert rank getting `moe_imbalance` x the mean routed tokens (zili.plan.cost.Step):
    layout fields, global_batch, memory (bytes and GB), step time (a `StepTime`), model TFLOP/s per device,
    MFU, tokens/s, days and chip-hours for `tokens`; or `infeasible` = why."""
    batch = global_batch or default_global_batch(layout, seq_len)
    out = {**layout.to_dict(), "global_batch": batch}
    why = (layout_problem(args, cluster, layout, seq_len, batch)
           or (None if global_batch else _batch_too_large(seq_len, batch)))
    if why:
        return {**out, "infeasible": why}
    mem = memory.memory(args, layout, seq_len, batch)
    out["memory"] = {k: (v / 1e9 if isinstance(v, float) else v) for k, v in mem.items()}
    out["mem_gb"] = mem["total"] / 1e9
    time = step_time(Step(args=args, seq_len=seq_len, layout=layout, cluster=cluster, global_batch=batch,
                          moe_imbalance=moe_imbalance))
    step = time.step_s
    model_flops = flops.flops_per_token(args, seq_len) * batch * seq_len
    out["time"] = time
    out["step_s"] = step
    out["tflops_per_device"] = model_flops / step / cluster.count / 1e12
    out["hardware_tflops_per_device"] = time.hardware_flops / step / cluster.count / 1e12
    out["mfu"] = out["tflops_per_device"] * 1e12 / cluster.peak_flops(layout.dtype)
    out["tokens_per_s"] = batch * seq_len / step
    out["days"] = tokens / out["tokens_per_s"] / 86400
    out["chip_hours"] = out["days"] * 24 * cluster.count
    limit = cluster.hbm_bytes * USABLE_HBM
    if mem["total"] > limit:
        out["infeasible"] = (f"needs {mem['total'] / 1e9:.1f} GB per chip on the {mem['stage']} stage but "
                             f"{cluster.chip} has {cluster.hbm_bytes / 1e9:.1f} GB ({cluster.row['hbm_gb']:g} GiB, "
                             f"{USABLE_HBM:.0%} usable) — "
                             "recompute more, shard more (dp_shard, tp, pp) or use a smaller micro-batch")
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(args: ModelArgs, cluster: Cluster, fixed: dict, seq_len: int) -> list[Layout]:
    """Every layout that agrees with `fixed` (layout field -> value) over the searched ranges."""
    n = cluster.count
    dtype = fixed.get("dtype") or ("bf16" if cluster.row.get("bf16_tflops") else "fp16")
    pow2 = [x for x in (1, 2, 4, 8, 16, 32, 64) if x <= cluster.per_node]
    opts = {
        "tp": pow2,
        "pp": [d for d in _divisors(n) if d <= args.n_layers],
        "vpp": [1, 2, 4],
        "cp": [1, 2, 4] if seq_len >= 16384 else [1],
        "ep": _divisors(args.n_routed_experts) if args.is_moe else [1],
        "microbatch": [1, 2, 4, 8],
        "recompute": ["none", "selective", "full"],
        "zero": [3],
    }
    for key, value in fixed.items():
        if key in opts:
            opts[key] = [value]
    out = []
    for tp, pp, vpp, cp in itertools.product(opts["tp"], opts["pp"], opts["vpp"], opts["cp"]):
        if n % (tp * pp * cp) or (vpp > 1 and pp == 1 and "vpp" not in fixed):
            continue
        dp = n // (tp * pp * cp)
        if "dp_replicate" in fixed and "dp_shard" in fixed:
            splits = [(fixed["dp_replicate"], fixed["dp_shard"])]
        elif "dp_replicate" in fixed:
            splits = [(fixed["dp_replicate"], dp // fixed["dp_replicate"] if dp % fixed["dp_replicate"] == 0 else 0)]
        elif "dp_shard" in fixed:
            splits = [(dp // fixed["dp_shard"] if dp % fixed["dp_shard"] == 0 else 0, fixed["dp_shard"])]
        else:
            splits = [(r, dp // r) for r in _divisors(dp)]
        for (r, d), ep, mb, rec, zero in itertools.product(splits, opts["ep"], opts["microbatch"], opts["recompute"],
                                                            opts["zero"]):
            if r == 0 or d == 0:
                continue
            sp = fixed.get("sequence_parallel", tp > 1)
            out.append(Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, dp_shard=d, dp_replicate=r, zero=zero,
                              microbatch=mb, recompute=rec, sequence_parallel=sp, dtype=dtype,
                              attention=fixed.get("attention", "flash")))
    if not out:  # the fixed values alone do not multiply out: still evaluate them, to say why
        out.append(Layout(**{**fixed, "dtype": dtype}))
    return out


def search(args: ModelArgs, cluster: Cluster, fixed: dict, *, seq_len: int, global_batch: int | None,
           tokens: float, top: int | None = 5, moe_imbalance: float = 1.0) -> dict:
    """{"layouts": the best `top` feasible evaluations (best first; all of them with None), "infeasible": {reason
    pattern: {count, example}}, "evaluated": how many, "rejected": the first infeasible one when none is
    feasible}."""
    results = [evaluate(args, cluster, layout, seq_len=seq_len, global_batch=global_batch, tokens=tokens,
                        moe_imbalance=moe_imbalance)
               for layout in candidates(args, cluster, fixed, seq_len)]
    feasible = sorted((r for r in results if "infeasible" not in r), key=lambda r: (-round(r["mfu"], 4), r["mem_gb"]))
    reasons: dict[str, dict] = {}  # reason with its numbers blanked -> {count, example}
    for r in results:
        if "infeasible" in r:
            entry = reasons.setdefault(re.sub(r"\d+(\.\d+)?", "#", r["infeasible"]),
                                       {"count": 0, "example": r["infeasible"]})
            entry["count"] += 1
    return {"layouts": feasible[:top], "infeasible": reasons, "evaluated": len(results),
            "rejected": [r for r in results if "infeasible" in r][:1] if not feasible else []}
