"""`zili plan` against published training runs: predicted step time and activation memory vs measured.

    python benchmarks/plan_validation.py [--runs FILE] [--sweep CSV] [--no-sp-unpublished] [--markdown]

For each [[run]] in the runs file (Megatron-LM 2021, Korthikanti et al. 2022, BLOOM-176B, MosaicML MPT), the
run's model is written to a temporary TOML model file and `zili plan ... --json` runs in this process with the
run's published layout (zili.plan.published.plan_args: the same arguments the test uses). Layout values the
source does not publish (Megatron-LM 2021: micro-batch, interleaving) are searched by the planner, as a user's
would be; sequence parallelism then takes the planner's default (on when tp > 1), or is turned off with
--no-sp-unpublished. The best layout's step_s is compared with the measured step_s.

For each [[memory]] row, `zili.plan.memory.activation_bytes(args, layout, seq_len, global_batch, "first")` — the
first pipeline stage's activations at the peak — is computed for the referenced run's layout twice:
recompute none without sequence parallelism, and selective recomputation with sequence parallelism, and
compared with the published GiB (2**30 bytes). Weights + gradients + optimizer state are compared too, for
information, with Megatron-LM's scheme (no ZeRO: 18 bytes per parameter, `zero=1` over one rank).

The sweep (--sweep, default tests/data/planner/mosaicml_mpt_a100_80gb.csv: MosaicML's whole A100-80GB table,
sequences of 512 to 65,536 tokens, models of 125 M to 70 B) is planned the same way and summarised by sequence
length and model size: it shows where the planner holds and where it does not. The runs file takes only its
rows at the models' training length (2,048) for models of 1 B parameters and more.

Errors are predicted / measured - 1. Prints one JSON document (`--markdown`: the tables of BENCHMARKS.md);
asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from zili.cli import main as zili_main  # noqa: E402
from zili.parallel.layout import Layout  # noqa: E402
from zili.plan import cost, memory  # noqa: E402
from zili.plan.published import mpt_sweep_runs, plan_args, write_toml  # noqa: E402
from zili.plan.spec import load_cluster, load_model  # noqa: E402

GIB = 2**30


def run_plan(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            zili_main(argv)
    except SystemExit as e:  # a UserError: main printed one line and exited
        raise RuntimeError(f"zili {' '.join(argv)} failed ({e.code}): {err.getvalue().strip()}") from None
    return json.loads(out.getvalue())


def _err(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def validate_runs(runs: list[dict], tmp: Path, sp_off_unpublished: bool = False) -> list[dict]:
    rows = []
    for run in runs:
        argv = ["plan", *plan_args(run, tmp, sp_off_unpublished), "--top", "1", "--json"]
        best = run_plan(argv)["layouts"][0]
        measured = run["measured"]["step_s"]
        t = best["time"]
        rows.append({
            "name": run["name"], "source": run["source"], "chips": run["count"],
            "published_layout": run["layout"],
            # left to the planner: vpp and microbatch are searched, sequence parallelism takes its default
            "not_published": sorted(k for k in ("vpp", "microbatch", "sequence_parallel") if k not in run["layout"]),
            "planned_layout": {k: best[k] for k in ("tp", "pp", "vpp", "dp_replicate", "dp_shard", "microbatch",
                                                    "recompute", "sequence_parallel", "dtype", "zero", "attention")},
            "measured_step_s": measured,
            "predicted_step_s": round(best["step_s"], 3),
            "ratio": round(best["step_s"] / measured, 4),
            "error": round(_err(best["step_s"], measured), 4),
            "parts_s": {k: round(t[k], 3) for k in ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s")},
            "microbatches": t["microbatches"],
            "mfu": round(best["mfu"], 4),
            "mem_gb": round(best["mem_gb"], 2),
            "command": "zili " + " ".join(Path(a).name if a.startswith(str(tmp)) else a for a in argv),
        })
    return rows


def validate_memory(memory_rows: list[dict], runs: list[dict], tmp: Path) -> list[dict]:
    by_name = {r["name"]: r for r in runs}
    rows = []
    for row in memory_rows:
        run = by_name[row["run"]]
        lay = run["layout"]
        args, seq_len = load_model(str(write_toml({"model": run["model"]}, tmp / f"{run['name']}.toml")))
        base = Layout(tp=lay["tp"], pp=lay["pp"], vpp=lay.get("vpp", 1), dp_replicate=lay["dp"], dp_shard=1,
                      microbatch=lay.get("microbatch", 1), dtype=lay["dtype"], attention=lay["attention"])
        cases = {
            "no_recompute": (Layout(**{**base.to_dict(), "recompute": "none", "sequence_parallel": False}),
                             row["measured"]["activations_gib_no_recompute"]),
            "selective_sp": (Layout(**{**base.to_dict(), "recompute": "selective", "sequence_parallel": True}),
                             row["measured"]["activations_gib_selective_sp"]),
        }
        out = {"name": row["name"], "run": row["run"],
               "layout": f"tp{base.tp} pp{base.pp} vpp{base.vpp} dp{base.dp} mb{base.microbatch}, "
                         f"global batch {lay['global_batch']}"}
        for key, (layout, published) in cases.items():
            predicted = memory.activation_bytes(args, layout, seq_len, lay["global_batch"], "first") / GIB
            out[key] = {"published_gib": published, "predicted_gib": round(predicted, 2),
                        "error": round(_err(predicted, published), 4)}
        if "weights_and_optimizer_gib" in row["measured"]:
            megatron = Layout(**{**base.to_dict(), "zero": 1})  # no ZeRO: 2 + 4 + 4 + 8 bytes per parameter
            w = memory.weight_bytes(args, megatron, "first")
            predicted = (w["params"] + w["grads"] + w["optimizer"]) / GIB
            published = row["measured"]["weights_and_optimizer_gib"]
            out["weights_and_optimizer"] = {"published_gib": published, "predicted_gib": round(predicted, 2),
                                            "error": round(_err(predicted, published), 4)}
        rows.append(out)
    return rows


def _band(run: dict) -> str:
    s = run["model"]["seq_len"]
    seq = "<= 1024" if s <= 1024 else "2048" if s == 2048 else "4096-8192" if s <= 8192 else ">= 16384"
    size = "< 1 B" if run["model_size"].endswith("m") else ">= 1 B"
    return f"seq {seq}, {size}"


def validate_sweep(runs: list[dict], tmp: Path) -> dict:
    """Per-row error (or the planner's refusal) and a summary per (sequence length, model size) band."""
    rows, bands = [], {}
    for run in runs:
        argv = ["plan", *plan_args(run, tmp), "--top", "1", "--json"]
        try:
            best = run_plan(argv)["layouts"][0]
            row = {"name": run["name"], "error": round(_err(best["step_s"], run["measured"]["step_s"]), 4)}
        except RuntimeError as e:  # the memory model says it does not fit, yet it ran
            row = {"name": run["name"], "refused": str(e).split(": ", 1)[-1]}
        rows.append(row)
        bands.setdefault(_band(run), []).append(row)
    summary = {}
    order = [f"seq {q}, {z}" for q in ("<= 1024", "2048", "4096-8192", ">= 16384") for z in (">= 1 B", "< 1 B")]
    for band, members in sorted(bands.items(), key=lambda kv: order.index(kv[0])):
        errs = [r["error"] for r in members if "error" in r]
        summary[band] = {"rows": len(members), "refused": len(members) - len(errs),
                         "median_error": round(statistics.median(errs), 4) if errs else None,
                         "max_abs_error": round(max(map(abs, errs)), 4) if errs else None}
    return {"rows": rows, "bands": summary}


def _layout_text(row: dict) -> str:
    """The planned layout; values the source did not publish (the planner's choice) marked *."""
    lay = row["planned_layout"]
    star = {k: "*" if k in row["not_published"] else "" for k in ("vpp", "microbatch", "sequence_parallel")}
    dp = f"dp{lay['dp_replicate']}" if lay["dp_shard"] == 1 else f"fsdp{lay['dp_shard']} z{lay['zero']}"
    return (f"tp{lay['tp']} pp{lay['pp']} v{lay['vpp']}{star['vpp']} {dp} "
            f"mb{lay['microbatch']}{star['microbatch']} {lay['recompute']}"
            + (f" sp{star['sequence_parallel']}" if lay["sequence_parallel"] else ""))


def markdown(doc: dict) -> str:
    """The result as the two Markdown tables of BENCHMARKS.md / docs/planner.md."""
    lines = ["| run | chips | layout (* = not published: the planner's) | batch | measured s | predicted s | error "
             "| compute / tp / pp / dp / bubble s |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in doc["runs"]:
        p = r["parts_s"]
        parts = " / ".join(f"{p[k]:.3g}" for k in ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s"))
        lines.append(f"| {r['name']} | {r['chips']} | {_layout_text(r)} | {r['published_layout']['global_batch']} "
                     f"| {r['measured_step_s']:g} | {r['predicted_step_s']:.2f} | {r['error']:+.1%} | {parts} |")
    s = doc["summary"]["step_time"]
    lines += ["", f"Step time: median |error| {s['median_abs_error']:.1%}, max {s['max_abs_error']:.1%}, "
                  f"mean signed {s['mean_signed_error']:+.1%} over {doc['summary']['runs']} runs.", ""]
    lines += ["| model (first stage) | layout | no recompute, no SP: published / predicted GiB | error "
              "| selective + SP: published / predicted GiB | error | weights+grads+Adam (no ZeRO): published / "
              "predicted GiB | error |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in doc["memory"]:
        cells = []
        for key in ("no_recompute", "selective_sp", "weights_and_optimizer"):
            c = m.get(key)
            cells += [f"{c['published_gib']:g} / {c['predicted_gib']:.2f}", f"{c['error']:+.1%}"] if c else ["", ""]
        lines.append(f"| {m['name']} | {m['layout']} | " + " | ".join(cells) + " |")
    lines += ["", f"Activations: max |error| {doc['summary']['activations']['max_abs_error']:.1%} over "
                  f"{doc['summary']['activations']['comparisons']} comparisons."]
    if doc.get("sweep"):
        lines += ["", "| MosaicML A100-80GB sweep band | rows | refused (memory) | median error | max abs error |",
                  "|---|---:|---:|---:|---:|"]
        for band, b in doc["sweep"]["bands"].items():
            med = f"{b['median_error']:+.1%}" if b["median_error"] is not None else "-"
            mx = f"{b['max_abs_error']:.1%}" if b["max_abs_error"] is not None else "-"
            lines.append(f"| {band} | {b['rows']} | {b['refused']} | {med} | {mx} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(REPO / "tests/data/planner/published_runs.toml"),
                   help="TOML file of [[run]] and [[memory]] rows")
    p.add_argument("--sweep", default=str(REPO / "tests/data/planner/mosaicml_mpt_a100_80gb.csv"),
                   help="CSV of a throughput sweep to summarise by band ('' to skip)")
    p.add_argument("--no-sp-unpublished", action="store_true", help="turn sequence parallelism off where a "
                   "run does not publish it (Megatron-LM 2021 predates it) instead of the planner's default")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead of the JSON document")
    args = p.parse_args(argv)
    data = tomllib.loads(Path(args.runs).read_text())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = validate_runs(data.get("run", []), Path(tmp), args.no_sp_unpublished)
        mems = validate_memory(data.get("memory", []), data.get("run", []), Path(tmp))
        sweep = validate_sweep(mpt_sweep_runs(Path(args.sweep)), Path(tmp)) if args.sweep else None
    step_err = [abs(r["error"]) for r in runs]
    act_err = [abs(m[k]["error"]) for m in mems for k in ("no_recompute", "selective_sp")]
    w_err = [abs(m["weights_and_optimizer"]["error"]) for m in mems if "weights_and_optimizer" in m]
    a100 = load_cluster("a100-80gb", 8, 8)
    summary = {
        "runs": len(runs),
        "step_time": {"median_abs_error": round(statistics.median(step_err), 4) if step_err else None,
                      "max_abs_error": round(max(step_err), 4) if step_err else None,
                      "mean_signed_error": round(statistics.mean(r["error"] for r in runs), 4) if runs else None},
        "activations": {"comparisons": len(act_err), "max_abs_error": round(max(act_err), 4) if act_err else None},
        "weights_and_optimizer": {"max_abs_error": round(max(w_err), 4) if w_err else None},
        "constants": {"matmul_efficiency_a100": cost.matmul_efficiency(a100),
                      "traffic_per_activation_byte": cost.TRAFFIC_PER_ACTIVATION_BYTE,
                      "link_efficiency": cost.LINK_EFFICIENCY, "latency_s": cost.LATENCY_S},
        "seconds": round(time.perf_counter() - start, 1),
    }
    doc = {"runs_file": str(Path(args.runs)), "runs": runs, "memory": mems, "summary": summary, "sweep": sweep}
    print(markdown(doc) if args.markdown else json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
