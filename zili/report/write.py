"""Put a report directory together: read the runs, draw the charts, write index.html — into a temporary
directory that replaces DIR only once complete (zili.fsio), so DIR is always a whole report or absent."""

from __future__ import annotations

from pathlib import Path

from zili.errors import UserError
from zili.fsio import atomic_dir
from zili.report.charts import write_charts
from zili.report.page import render
from zili.report.runs import load_runs


def output_dir(run_dirs: list[Path], output: Path | None) -> Path:
    """Where the report goes: `output`, or RUN_DIR/report for one run. Refuses a directory that would replace
    a run or something that is not an earlier report (DIR is replaced as a whole)."""
    if output is None:
        if len(run_dirs) > 1:
            raise UserError("several runs: say where their report goes with --output DIR")
        output = run_dirs[0] / "report"
    output = Path(output)
    final = output.resolve()
    for run in run_dirs:
        if final == run.resolve() or final in run.resolve().parents:
            raise UserError(f"--output {output} would replace the run {run} — choose a directory outside it")
    if final.exists() and not final.is_dir():
        raise UserError(f"--output {output} is a file — choose a directory (it is written as a whole)")
    if final.is_dir() and any(final.iterdir()) and not (final / "index.html").is_file():
        raise UserError(f"--output {output} exists and is not a zili report — choose a new or empty directory "
                        "(an earlier report there is replaced as a whole)")
    return output


def write_report(run_dirs, output=None) -> Path:
    """Write the report of `run_dirs` (in that order) into `output` (default RUN_DIR/report for one run):
    index.html plus one PNG per chart. Returns the directory. Raises UserError for bad runs or an output
    directory that cannot be written."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise UserError("give at least one run directory")
    runs = load_runs(run_dirs)
    output = output_dir(run_dirs, None if output is None else Path(output))
    try:
        with atomic_dir(output) as tmp:
            charts = write_charts(runs, tmp)
            (tmp / "index.html").write_text(render(runs, charts), encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the report to {output} ({e.strerror or e.__class__.__name__}) — choose "
                        "another --output") from None
    return output
