"""Where the planner's constants come from for a chip, and `--calibrate`: the matmul efficiency measured by
`zili bench` on the user's own chip.

`constants(cluster, moe_imbalance)` lists each constant the step time uses with its value and origin:
`matmul_efficiency` calibrated on published runs on the chip (its chip row's `calibration`; `held_out` says how
far the runs not used to fit it are off), measured by `zili bench` (after `calibrate`), or the uncalibrated
default; `all_to_all_exposed`, fitted on published MoE runs on the chip (`all_to_all_calibration`) or 1; the
traffic per activation byte, fitted once on A100 runs and used for every chip; the link efficiency and per-call
latency, assumptions; the MoE imbalance, the user's flag.

`calibrate(cluster, result, workload_args, path)` inverts the planner on the bench run: one device training
`workload_args` on `result["batch"]` sequences of `result["seq_len"]` tokens in bf16, no recomputation, flash
attention. Its planned step time is hardware FLOPs / (peak x efficiency) + the elementwise time (no
communication on one device), so the efficiency that reproduces the measured `step_s` is
FLOPs / (peak x (step_s - elementwise)). The bench step also holds what the planner does not time (optimizer
step, kernel launches): the measured efficiency absorbs them, as the published-run calibration does.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.parallel.layout import Layout
from zili.plan import cost
from zili.plan.spec import Cluster

BENCH_FIELDS = ("chip", "workload", "batch", "seq_len", "dtype", "step_s")


def load_bench(path: str) -> dict:
    """A `zili bench --json` result; UserError when the file is missing, not JSON or lacks a field."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--calibrate {path}: cannot read a `zili bench --json` result ({e})") from None
    missing = [k for k in BENCH_FIELDS if not isinstance(result, dict) or k not in result]
    if missing:
        raise UserError(f"--calibrate {path}: not a `zili bench --json` result (no {', '.join(missing)})")
    return result


def bench_efficiency(cluster: Cluster, result: dict, args: ModelArgs) -> float:
    """The matmul efficiency for which the planner's step time of the bench run equals its measured `step_s`."""
    if result["dtype"] != "bf16":
        raise UserError(f"the bench result ran in {result['dtype']}, not bf16 — rerun `zili bench` with --dtype bf16")
    batch, seq_len = int(result["batch"]), int(result["seq_len"])
    layout = Layout(microbatch=batch)
    one_chip = replace(cluster, count=1, per_node=1, row={**cluster.row, "matmul_efficiency": 1.0})
    step = cost.Step(args=args, seq_len=seq_len, layout=layout, cluster=one_chip, global_batch=batch)
    elementwise = cost.elementwise_time(step)
    at_peak = cost.compute_time(step, cost.layer_flops(step)) - elementwise  # matmul seconds at 100 % of peak
    spare = float(result["step_s"]) - elementwise
    if spare <= at_peak:
        raise UserError(f"the bench step ({result['step_s']:.4g} s) is faster than {cluster.chip}'s peak allows "
                        f"({at_peak + elementwise:.4g} s) — calibrate with a result measured on this chip")
    return at_peak / spare


def calibrate(cluster: Cluster, result: dict, args: ModelArgs, path: str) -> Cluster:
    """`cluster` with the chip's matmul efficiency measured by the bench `result` (of `args`, from `path`)."""
    if result["chip"] not in ("unknown", cluster.chip):
        raise UserError(f"--calibrate {path} was measured on {result['chip']}, not {cluster.chip} — plan with "
                        f"--chip {result['chip']} or benchmark the chip you plan for")
    efficiency = bench_efficiency(cluster, result, args)
    origin = (f"measured by zili bench on this chip ({path}: {result['workload']}, batch {result['batch']} x "
              f"{result['seq_len']} tokens, {float(result['step_s']):.4g} s a step)")
    row = {**cluster.row, "matmul_efficiency": efficiency, "calibration": origin}
    row.pop("held_out", None)
    return replace(cluster, row=row)


def constants(cluster: Cluster, moe_imbalance: float = 1.0) -> list[dict]:
    """Each constant of the step time for this chip: {name, value, origin}; `matmul_efficiency` also says how
    far the held-out published runs are off (`held_out`, "" when the chip has none)."""
    row = cluster.row
    if "matmul_efficiency" in row:
        origin = row.get("calibration") or "the chip file's matmul_efficiency (origin not given)"
    else:
        origin = "uncalibrated default for this chip"
    efficiency = {"name": "matmul_efficiency", "value": cost.matmul_efficiency(cluster), "origin": origin,
                  "held_out": row.get("held_out", "")}
    return [efficiency,
            {"name": "traffic_per_activation_byte", "value": cost.TRAFFIC_PER_ACTIVATION_BYTE,
             "origin": "fitted once on the Megatron-LM A100 runs, used for every chip"},
            {"name": "all_to_all_exposed", "value": cost.all_to_all_exposed(cluster),
             "origin": row.get("all_to_all_calibration") or ("the chip file's all_to_all_exposed (origin not given)"
                                                              if "all_to_all_exposed" in row else
                                                              "uncalibrated default: every expert all-to-all exposed")},
            {"name": "link_efficiency", "value": cost.LINK_EFFICIENCY, "origin": "default (assumption)"},
            {"name": "latency_s", "value": cost.LATENCY_S, "origin": "default (assumption)"},
            {"name": "moe_imbalance", "value": moe_imbalance,
             "origin": "--moe-imbalance" if moe_imbalance != 1.0 else "default: perfectly balanced experts"}]
