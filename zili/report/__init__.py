"""`zili report RUN_DIR [RUN_DIR ...]`: runs seen side by side — their metrics.jsonl drawn as PNG charts (several
runs overlaid on each) and their config.toml files in one table, on a self-contained HTML page.

runs.py reads the run directories, charts.py draws, page.py writes the HTML, write.py puts the directory
together atomically. TensorBoard event files (metrics.tensorboard) are written by zili.train.metrics.
"""

from zili.report.write import write_report

__all__ = ["write_report"]
