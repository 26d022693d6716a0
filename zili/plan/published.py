"""Published training runs as `zili plan` arguments: the validation's one translation from a run row to a plan.

A run row (tests/data/planner/published_runs.toml and heldout_runs.toml, `[[run]]`) has `chip`, `count`,
`per_node`, a `model` table (the model-file keys) or a zili `preset` with its `seq_len`, a `layout` table and
optional `chip_overrides` (chip-table fields that differ on the run's cluster, e.g. its network). Layout keys:
tp, pp, dp, global_batch (sequences), recompute, dtype, attention, and where published vpp, microbatch,
sequence_parallel, zero, ep, cp. Without `zero`, dp is plain replication
(Megatron-LM's data parallelism: `--dp-replicate dp --dp-shard 1`, the planner's default ZeRO over one rank);
with it, dp ranks shard under that ZeRO stage (`--dp-shard dp --zero Z`). Values a source does not publish are
left out, so the planner searches them as it would for a user.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import tomli_w

from zili.accel import load_chips
from zili.plan.search import search
from zili.plan.spec import load_cluster, load_model


def write_toml(data: dict, path: Path) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


def chip_argument(run: dict, work_dir: Path) -> str:
    """The chip-table row name, or a chip file of that row with the run's `chip_overrides` applied."""
    if "chip_overrides" not in run:
        return run["chip"]
    row = {k: v for k, v in load_chips()[run["chip"]].items() if isinstance(v, (int, float))}
    return str(write_toml({"chip": {run["name"]: {**row, **run["chip_overrides"]}}},
                          work_dir / f"{run['name']}.chip.toml"))


def plan_args(run: dict, work_dir: Path, sp_off_unpublished: bool = False) -> list[str]:
    """`zili plan` arguments (after "plan") for the run's published model and layout; writes the model file
    (and a chip file if needed) into `work_dir`. With `sp_off_unpublished`, sequence parallelism is off where
    the source does not give it, instead of the planner's default."""
    lay = run["layout"]
    if "preset" in run:  # a zili preset at the run's sequence length
        model = [run["preset"], "--seq-len", run["seq_len"]]
    else:
        model = [write_toml({"model": run["model"]}, work_dir / f"{run['name']}.toml")]
    dp = (["--dp-shard", lay["dp"], "--dp-replicate", 1, "--zero", lay["zero"]] if "zero" in lay
          else ["--dp-replicate", lay["dp"], "--dp-shard", 1])
    argv = ["--model", *model, "--chip", chip_argument(run, work_dir), "--count", run["count"],
            "--per-node", run["per_node"], "--tp", lay["tp"], "--pp", lay["pp"], *dp,
            "--recompute", lay["recompute"], "--dtype", lay["dtype"], "--attention", lay["attention"],
            "--global-batch", lay["global_batch"]]
    for key in ("vpp", "microbatch", "ep", "cp"):
        if key in lay:
            argv += [f"--{key}", lay[key]]
    if "sequence_parallel" in lay:
        argv.append("--sequence-parallel" if lay["sequence_parallel"] else "--no-sequence-parallel")
    elif sp_off_unpublished:
        argv.append("--no-sequence-parallel")
    return [str(a) for a in argv]


def mpt_sweep_runs(csv_path: Path, chip: str = "a100-80gb") -> list[dict]:
    """Run rows on `chip` for a MosaicML MPT throughput table (tests/data/planner/mosaicml_mpt_*.csv): GELU
    blocks, ffn 4 d, tied embeddings, no dropout, vocabulary 50368; FSDP (ZeRO-3) over every GPU, bf16,
    FlashAttention; measured step_s = global batch x seq_len / tokens per second. `model_size` is MPT's name."""
    lines = [line for line in csv_path.read_text().splitlines() if line and not line.startswith("#")]
    header = lines[0].split(",")
    runs = []
    for line in lines[1:]:
        r = dict(zip(header, line.split(",")))
        n = {k: int(r[k]) for k in ("n_layers", "dim", "n_heads", "seq_len", "gpus", "microbatch", "global_batch",
                                     "tokens_per_s")}
        runs.append({
            "name": f"mpt-{r['model']}-s{n['seq_len']}-{n['gpus']}gpu-mb{n['microbatch']}", "model_size": r["model"],
            "chip": chip, "count": n["gpus"], "per_node": 8,
            "model": {"n_layers": n["n_layers"], "dim": n["dim"], "n_heads": n["n_heads"], "n_kv_heads": n["n_heads"],
                      "ffn_dim": 4 * n["dim"], "vocab_size": 50368, "seq_len": n["seq_len"], "mlp": "gelu",
                      "tied_embeddings": True},
            "layout": {"tp": 1, "pp": 1, "dp": n["gpus"], "zero": 3, "global_batch": n["global_batch"],
                       "microbatch": n["microbatch"], "recompute": "full" if r["activation_checkpointing"] == "true"
                       else "none", "dtype": "bf16", "attention": "flash"},
            "measured": {"step_s": n["global_batch"] * n["seq_len"] / n["tokens_per_s"]},
        })
    return runs


def predict(run: dict, work_dir: Path) -> dict:
    """The planner's step time for a run row with its published layout, through the search `zili plan` uses but
    without refusing a layout whose planned memory exceeds the chip (the run did fit: that is reported as
    `refused`, the memory model's miss, and the step time is still compared). Returns name, chip, group, kind,
    measured_s, predicted_s, error (predicted / measured - 1), mem_gb and refused (the reason, or "")."""
    lay = run["layout"]
    if "preset" in run:
        args, seq_len = load_model(run["preset"], run["seq_len"])
    else:
        args, seq_len = load_model(str(write_toml({"model": run["model"]}, work_dir / f"{run['name']}.toml")))
    cluster = load_cluster(chip_argument(run, work_dir), run["count"], run["per_node"])
    sharded = "zero" in lay
    fixed = {"tp": lay["tp"], "pp": lay["pp"], "dp_shard": lay["dp"] if sharded else 1,
             "dp_replicate": 1 if sharded else lay["dp"], "zero": lay.get("zero", 3),
             "recompute": lay["recompute"], "dtype": lay["dtype"], "attention": lay["attention"],
             **{k: lay[k] for k in ("vpp", "microbatch", "ep", "cp", "sequence_parallel") if k in lay}}
    found = search(args, cluster, fixed, seq_len=seq_len, global_batch=lay["global_batch"], tokens=1e12, top=1,
                   moe_imbalance=run.get("moe_imbalance", 1.0))
    best = found["layouts"][0] if found["layouts"] else found["rejected"][0]
    if "step_s" not in best:
        raise ValueError(f"{run['name']}: the planner cannot run the published layout: {best['infeasible']}")
    measured = run["measured"]["step_s"]
    return {"name": run["name"], "chip": run["chip"], "group": run.get("group", ""), "kind": run.get("kind", "dense"),
            "measured_s": measured, "predicted_s": best["step_s"], "error": best["step_s"] / measured - 1,
            "mem_gb": best["mem_gb"], "refused": best.get("infeasible", "")}


def held_out_summary(predictions: list[dict], chip: str) -> str:
    """One line per source for a chip row's `held_out` field: "group (n runs): median |error| x %, max y %", the
    sources in first-seen order, joined by "; " ("" when no prediction is on `chip`)."""
    groups: dict[str, list[float]] = {}
    for p in predictions:
        if p["chip"] == chip:
            groups.setdefault(p["group"], []).append(abs(p["error"]))
    return "; ".join(f"{g} ({len(e)} run{'s' if len(e) > 1 else ''}): median |error| {statistics.median(e):.1%}, "
                     f"max {max(e):.1%}" for g, e in groups.items())
