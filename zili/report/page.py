"""The report's index.html: a summary table, the charts (PNG files next to the page, referenced by relative
name) and the runs' configs side by side, rows that differ highlighted. Plain HTML and CSS, no script, nothing
fetched: the directory can be copied, zipped or served as it is."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime

import jinja2

from zili.report.charts import COLOURS, Chart
from zili.report.runs import Run

# (column, metrics.jsonl field, how the run's values become one figure, format)
SUMMARY = (
    ("last step", "step", "last", "{:d}"),
    ("last loss", "loss", "last", "{:.4f}"),
    ("best val loss", "val_loss", "min", "{:.4f}"),
    ("last val accuracy", "val_accuracy", "last", "{:.1%}"),
    ("median tokens/s", "tokens_per_s", "median", "{:,.0f}"),
    ("median MFU", "mfu", "median", "{:.1%}"),
    ("peak memory GB", "peak_mem_gb", "max", "{:.2f}"),
    ("skipped steps", "skipped_steps", "last", "{:d}"),
)
REDUCE = {"last": lambda v: v[-1], "min": min, "max": max, "median": statistics.median}

TEMPLATE = jinja2.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>zili report: {{ runs | map(attribute="name") | join(", ") }}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1320px; padding: 0 1em; color: #222; }
  h1 { font-size: 1.5em; margin-bottom: 0.2em; }
  h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
  .meta { color: #666; font-size: 0.9em; }
  table { border-collapse: collapse; font-size: 0.9em; }
  th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
  th { background: #f4f4f4; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.value { font-family: ui-monospace, monospace; word-break: break-all; max-width: 28em; }
  tr.differs td { background: #fff3c4; }
  .swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.4em; }
  .charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0.8em; }
  .charts img { width: 100%; height: auto; border: 1px solid #eee; }
</style>
</head>
<body>
<h1>zili report</h1>
<p class="meta">{{ runs | length }} run{{ "s" if runs | length > 1 }}, written {{ written }}.
Charts are the PNG files next to this page.</p>

<h2>Runs</h2>
<table>
<tr><th>run</th><th>directory</th><th>records</th>{% for column in columns %}<th>{{ column }}</th>{% endfor %}</tr>
{% for row in summary %}<tr><td><span class="swatch" style="background: {{ row.colour }}"></span>{{ row.name }}</td>
<td class="value">{{ row.path }}</td><td class="num">{{ row.records }}</td>
{% for cell in row.cells %}<td class="num">{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>

<h2>Charts</h2>
{% if charts %}<div class="charts">
{% for chart, file in charts %}<img src="{{ file }}" alt="{{ chart.title }}" title="{{ chart.title }}">
{% endfor %}</div>
{% else %}<p>No logged step has numbers yet.</p>{% endif %}

<h2>Configs</h2>
{% if config_rows %}<p class="meta">From each run's config.toml.{% if runs | length > 1 %}
{{ differing | length }} key{{ "s" if differing | length != 1 }} differ{{ "s" if differing | length == 1 }}{%
if differing %} (highlighted): {{ differing | join(", ") }}{% endif %}.{% endif %}</p>
<table>
<tr><th>key</th>{% for run in runs %}<th>{{ run.name }}</th>{% endfor %}</tr>
{% for key, values, differs in config_rows %}<tr{% if differs %} class="differs"{% endif %}><td>{{ key }}</td>
{% for value in values %}<td class="value">{{ value }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>No run has a config.toml.</p>{% endif %}
</body>
</html>
""", autoescape=True)


def _show(value) -> str:
    """A config value as TOML writes it (strings bare, the empty one as ""); an absent key as an em dash."""
    if value is _ABSENT:
        return "—"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


_ABSENT = object()


def config_rows(runs: list[Run]) -> list[tuple[str, list[str], bool]]:
    """(key, one shown value per run, whether they differ), keys in first-seen order."""
    keys = list(dict.fromkeys(k for run in runs for k in (run.config or {})))
    rows = []
    for key in keys:
        values = [(run.config or {}).get(key, _ABSENT) for run in runs]
        shown = [_show(v) for v in values]
        rows.append((key, shown, len(runs) > 1 and len(set(shown)) > 1))
    return rows


def summary(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """The summary table's figure columns (those some run has data for) and one row per run."""
    figures = []
    for run in runs:
        row = {}
        for column, key, how, fmt in SUMMARY:
            values = [r["step"] for r in run.records] if key == "step" else run.series(key)[1]
            if values:
                value = REDUCE[how](values)
                row[column] = fmt.format(int(value) if fmt == "{:d}" else value)
        figures.append(row)
    columns = [column for column, *_ in SUMMARY if any(column in row for row in figures)]
    rows = [{"name": run.name, "path": str(run.path.resolve()), "records": len(run.records),
             "colour": COLOURS[i % len(COLOURS)],
             "cells": [row.get(column, "—") for column in columns]}
            for i, (run, row) in enumerate(zip(runs, figures))]
    return columns, rows


def render(runs: list[Run], charts: list[tuple[Chart, str]]) -> str:
    """index.html's text. `charts`: (chart, PNG file name relative to the page), in the order shown."""
    rows = config_rows(runs)
    columns, table = summary(runs)
    return TEMPLATE.render(runs=runs, written=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), columns=columns,
                           summary=table, charts=charts, config_rows=rows,
                           differing=[key for key, _, differs in rows if differs])
