"""Published training runs as `zili plan` arguments: the validation's one translation from a run row to a plan.

A run row (tests/data/planner/published_runs.toml, `[[run]]`) has `chip`, `count`, `per_node`, a `model` table
(the model-file keys), a `layout` table and optional `chip_overrides` (chip-table fields that differ on the
run's cluster, e.g. its network). Layout keys: tp, pp, dp, global_batch (sequences), recompute, dtype,
attention, and where published vpp, microbatch, sequence_parallel, zero. Without `zero`, dp is plain replication
(Megatron-LM's data parallelism: `--dp-replicate dp --dp-shard 1`, the planner's default ZeRO over one rank);
with it, dp ranks shard under that ZeRO stage (`--dp-shard dp --zero Z`). Values a source does not publish are
left out, so the planner searches them as it would for a user.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from zili.accel import load_chips


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
    model = write_toml({"model": run["model"]}, work_dir / f"{run['name']}.toml")
    dp = (["--dp-shard", lay["dp"], "--dp-replicate", 1, "--zero", lay["zero"]] if "zero" in lay
          else ["--dp-replicate", lay["dp"], "--dp-shard", 1])
    argv = ["--model", model, "--chip", chip_argument(run, work_dir), "--count", run["count"],
            "--per-node", run["per_node"], "--tp", lay["tp"], "--pp", lay["pp"], *dp,
            "--recompute", lay["recompute"], "--dtype", lay["dtype"], "--attention", lay["attention"],
            "--global-batch", lay["global_batch"]]
    for key in ("vpp", "microbatch"):
        if key in lay:
            argv += [f"--{key}", lay[key]]
    if "sequence_parallel" in lay:
        argv.append("--sequence-parallel" if lay["sequence_parallel"] else "--no-sequence-parallel")
    elif sp_off_unpublished:
        argv.append("--no-sequence-parallel")
    return [str(a) for a in argv]


def mpt_sweep_runs(csv_path: Path) -> list[dict]:
    """Run rows for MosaicML's MPT throughput table (tests/data/planner/mosaicml_mpt_a100_80gb.csv): GELU
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
            "chip": "a100-80gb", "count": n["gpus"], "per_node": 8,
            "model": {"n_layers": n["n_layers"], "dim": n["dim"], "n_heads": n["n_heads"], "n_kv_heads": n["n_heads"],
                      "ffn_dim": 4 * n["dim"], "vocab_size": 50368, "seq_len": n["seq_len"], "mlp": "gelu",
                      "tied_embeddings": True},
            "layout": {"tp": 1, "pp": 1, "dp": n["gpus"], "zero": 3, "global_batch": n["global_batch"],
                       "microbatch": n["microbatch"], "recompute": "full" if r["activation_checkpointing"] == "true"
                       else "none", "dtype": "bf16", "attention": "flash"},
            "measured": {"step_s": n["global_batch"] * n["seq_len"] / n["tokens_per_s"]},
        })
    return runs
