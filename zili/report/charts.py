"""The report's charts: one PNG per metric, every run a line on it (the same colour in every chart).

Drawn with matplotlib's object interface (a `Figure` rendered by Agg, no pyplot): no display, no global state.
A chart none of the runs has data for is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from zili.report.runs import Run
from zili.train.metrics import scalars


@dataclass(frozen=True)
class Chart:
    name: str  # the PNG's file name without .png
    title: str
    ylabel: str
    keys: tuple[str, ...]  # metrics.jsonl fields drawn: the first as a line, the others dashed with markers
    scale: float = 1.0  # values are multiplied by it (fractions shown as %)
    from_zero: bool = False  # the y axis starts at 0 (small changes of a large amount not blown up)
    integer: bool = False  # a count: whole-number ticks


CHARTS = (
    Chart("loss", "Loss", "nats/token", ("loss", "val_loss")),
    Chart("lr", "Learning rate", "learning rate", ("lr",)),
    Chart("grad_norm", "Gradient norm", "global L2 norm", ("grad_norm",)),
    Chart("tokens_per_s", "Throughput", "tokens/s (all ranks)", ("tokens_per_s",)),
    Chart("mfu", "Model FLOPs utilisation", "% of peak FLOP/s", ("mfu",), scale=100.0),
    Chart("peak_mem_gb", "Peak memory", "GB (busiest device)", ("peak_mem_gb",), from_zero=True),
    Chart("skipped_steps", "Skipped steps", "non-finite steps so far", ("skipped_steps",), from_zero=True,
          integer=True),
    Chart("expert_load", "Expert load", "busiest expert / mean", ("expert_load",)),
    Chart("mtp_loss", "Multi-token prediction loss", "nats/token", ("mtp_loss",)),
    Chart("reward", "Reward", "mean reward", ("reward_mean",)),
    Chart("accuracy", "Accuracy", "share correct", ("accuracy", "val_accuracy")),
    Chart("kl", "KL to the starting model", "k3 estimate", ("kl",)),
    Chart("completion_len", "Completion length", "tokens", ("completion_len",)),
)
# matplotlib's tab10 as hex, so that the page's colour swatches match the lines; run i gets COLOURS[i % 10]
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def charts_for(runs: list[Run]) -> list[Chart]:
    """CHARTS that some run has data for, then one chart for each other numeric field (in first-seen order)."""
    present = {}
    for run in runs:
        for record in run.records:
            present.update(dict.fromkeys(scalars(record)))
    named = [c for c in CHARTS if any(k in present for k in c.keys)]
    drawn = {k for c in CHARTS for k in c.keys}
    taken = {c.name for c in named}
    extra = []
    for key in present:
        if key not in drawn:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
            while name in taken:
                name += "_"
            taken.add(name)
            extra.append(Chart(name, key, key, (key,)))
    return named + extra


def draw(chart: Chart, runs: list[Run]) -> Figure:
    """The chart as a Figure: for each run (colour) and key (line style) with data, one line."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        for j, key in enumerate(chart.keys):
            steps, values = run.series(key, chart.scale)
            if not steps:
                continue
            label = run.name if len(chart.keys) == 1 else f"{run.name} {key}"
            marker = "o" if j > 0 or len(steps) == 1 else None  # sparse series (validations) and lone points
            ax.plot(steps, values, color=colour, linestyle="-" if j == 0 else "--", marker=marker, markersize=4,
                    linewidth=1.4, label=label)
    ax.set_title(chart.title)
    ax.set_xlabel("step")
    ax.set_ylabel(chart.ylabel)
    ax.grid(True, alpha=0.3)
    if chart.integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if chart.from_zero and ax.get_lines():  # from a little below 0, so that a line at 0 shows above the axis
        top = 1.08 * max(max(line.get_ydata()) for line in ax.get_lines())
        top = max(top, 1.0) if chart.integer else top or 1.0
        ax.set_ylim(-0.03 * top, top)
    if ax.get_lines() and (len(ax.get_lines()) > 1 or len(runs) > 1):
        ax.legend(fontsize="small")
    return fig


def write_charts(runs: list[Run], out_dir: Path) -> list[tuple[Chart, str]]:
    """One PNG per chart with data into `out_dir`; the charts with their file names."""
    written = []
    for chart in charts_for(runs):
        file = f"{chart.name}.png"
        draw(chart, runs).savefig(Path(out_dir) / file)
        written.append((chart, file))
    return written
