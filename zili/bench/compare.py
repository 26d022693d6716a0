"""`zili bench --compare A.json B.json ...`: a side-by-side table of bench results and a bar chart PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tabulate import tabulate

from zili.errors import UserError

ROWS = [("workload", "workload", "{}"), ("chip", "chip", "{}"), ("batch x seq", None, "{}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"), ("TFLOP/s", "tflops", "{:.2f}"), ("MFU", "mfu", "{:.1%}"),
        ("peak mem GB", "peak_mem_gb", "{:.2f}"), ("vs A100-80GB", "a100_ratio", "{:.3f}")]
REQUIRED = ("device", "chip", "workload", "tokens_per_s", "tflops", "mfu", "peak_mem_gb", "a100_ratio")


def read_results(paths) -> list[dict]:
    results = []
    for path in map(Path, paths):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # missing, not JSON, not UTF-8 text
            raise UserError(f"cannot read bench result {path} ({e.__class__.__name__}) — pass files written by "
                            "`zili bench --json`") from None
        missing = [k for k in REQUIRED if not isinstance(result, dict) or k not in result]
        if missing:
            raise UserError(f"{path} is not a `zili bench --json` result (no {', '.join(missing)})")
        results.append(result)
    return results


def label(result: dict) -> str:
    return f"{result['device']} ({result['chip']})"


def table(results: list[dict]) -> str:
    """Metrics down, one column per result."""
    header = ["", *[label(r) for r in results]]
    lines = [header]
    for title, key, fmt in ROWS:
        if key is None:
            cells = [f"{r.get('batch')} x {r.get('seq_len')}" for r in results]
        else:
            cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for r in results]
        lines.append([title, *cells])
    return tabulate(lines[1:], lines[0], tablefmt="plain", colalign=("left", *["right"] * len(results)),
                    disable_numparse=True)


def chart(results: list[dict], png: Path) -> Path:
    """Bars of tokens/s and MFU per result, written to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['chip']}\n{r['workload']}" for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(results), 4))
    left.bar(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    left.set_title("training tokens/s")
    # a result without a known peak has mfu null: no bar (NaN), its table cell shows "-"
    right.bar(names, [100 * r["mfu"] if r.get("mfu") is not None else math.nan for r in results], color="tab:orange")
    right.set_title("MFU (% of bf16 peak)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("zili bench — " + ", ".join(sorted({r["workload"] for r in results})))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
