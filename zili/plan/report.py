"""The plan as text (a table of the best layouts) or as JSON (`layouts[]`, one object per layout); the one
place where the plan's dataclasses (a layout's `time`, a `zili.plan.cost.StepTime`) become dicts.

JSON layout fields: tp, pp, vpp, cp, ep, dp_shard, dp_replicate, zero, microbatch, recompute,
sequence_parallel, dtype, attention, global_batch (sequences), mem_gb (1e9 bytes per chip), memory{params, grads,
optimizer, buffers, activations, total: GB; stage}, step_s, time{compute_s, bubble_s, tp/pp/ep/cp/dp_comm_s,
microbatches, hardware_flops}, tflops_per_device (model FLOPs), hardware_tflops_per_device, mfu, tokens_per_s,
days and chip_hours for the token budget; `verify` = {measured_bytes, analytic_bytes, ...} with --verify.
"""

from __future__ import annotations

import dataclasses
import json

from tabulate import tabulate


def _fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _plain(value):
    """JSON for what json does not know: dataclasses by their fields, anything else as a number."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return float(value)


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=1, default=_plain)


def table(plan: dict) -> str:
    """Human-readable plan: header, one row per layout, memory and time breakdowns, infeasible reasons."""
    m, c = plan["model"], plan["cluster"]
    lines = [f"model {m['name']}: {_fmt_count(m['params'])} parameters ({_fmt_count(m['active_params'])} active), "
             f"seq_len {m['seq_len']}; {c['count']} x {c['chip']} ({c['per_node']} per node); "
             f"{_fmt_count(plan['tokens'])} tokens"]
    if plan.get("advice"):
        lines.append(plan["advice"])
    head = ["#", "layout", "batch", "mem GB", "params+grads+opt / act GB", "step s", "compute / comm / bubble s",
            "TF/s/dev", "MFU", "tokens/s", "days", "chip-hours"]
    rows = []
    for i, r in enumerate(plan["layouts"], 1):
        mem, t = r["memory"], r["time"]
        comm = t.tp_comm_s + t.pp_comm_s + t.ep_comm_s + t.cp_comm_s + t.dp_comm_s
        layout = (f"tp{r['tp']} pp{r['pp']}" + (f"v{r['vpp']}" if r["vpp"] > 1 else "")
                  + "".join(f" {k}{r[k]}" for k in ("cp", "ep") if r[k] > 1)
                  + f" dp{r['dp_replicate']}x{r['dp_shard']} z{r['zero']} mb{r['microbatch']} {r['recompute']}"
                  + (" sp" if r["sequence_parallel"] else "") + f" {r['dtype']}"
                  + ("" if r["attention"] == "flash" else f" {r['attention']}"))
        rows.append([str(i), layout, str(r["global_batch"]), f"{r['mem_gb']:.1f}",
                     f"{mem['params'] + mem['grads'] + mem['optimizer']:.1f} / {mem['activations']:.1f}",
                     f"{r['step_s']:.3g}", f"{t.compute_s:.3g} / {comm:.3g} / {t.bubble_s:.3g}",
                     f"{r['tflops_per_device']:.0f}", f"{r['mfu']:.1%}", _fmt_count(r["tokens_per_s"]),
                     f"{r['days']:.3g}", _fmt_count(r["chip_hours"])])
    align = ["left" if i == 1 else "right" for i in range(len(head))]  # the layout reads left to right
    lines.append(tabulate(rows, headers=head, tablefmt="plain", colalign=align, disable_numparse=True))
    for i, r in enumerate(plan["layouts"], 1):
        if "verify" in r:
            v = r["verify"]
            lines.append(f"verify #{i} (rank {v['rank']} of {v['world_size']}, stages {v['stage_ids']}): measured "
                         f"params+grads+optimizer {v['measured_bytes'] / 1e9:.3f} GB, analytic "
                         f"{v['analytic_bytes'] / 1e9:.3f} GB ({v['measured_bytes'] / v['analytic_bytes'] - 1:+.2%})")
    if plan["infeasible"]:
        total = sum(e["count"] for e in plan["infeasible"].values())
        lines.append(f"{total} of {plan['evaluated']} layouts cannot run; most common reasons (one example each):")
        for e in sorted(plan["infeasible"].values(), key=lambda e: -e["count"])[:3]:
            lines.append(f"  {e['count']:6d}  {e['example']}")
    lines.append("constants (docs/planner.md, Calibration):")
    for c in plan["assumptions"]["constants"]:
        lines.append(f"  {c['name']} {c['value']:.3g}: {c['origin']}")
        if c.get("held_out"):
            lines.append(f"    held-out published runs: {c['held_out']}")
    return "\n".join(lines)
