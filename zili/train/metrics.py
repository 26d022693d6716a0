"""Training metrics: RUN_DIR/metrics.jsonl (rank 0 writes) and a console progress bar.

Each logged step appends one JSON object with at least
`step, loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_gb, skipped_steps`, plus `val_loss` when validation
ran at that step. `skipped_steps` counts the steps of the run so far whose update was skipped because their
loss or gradient norm was not finite; a non-finite figure is written as null. The line for step 0 (validation
of the untrained model) carries `val_loss` and `null` for the training figures. Units: loss in nats/token,
tokens_per_s in tokens per second over all ranks, mfu a fraction of the devices' peak FLOP/s, peak_mem_gb in
1e9 bytes.

MFU = flops_per_token (zili.models.flops) x tokens_per_s / (peak FLOP/s per device x devices).

With `metrics.tensorboard = true` the same records also go to TensorBoard event files in RUN_DIR/tensorboard/:
every numeric field of a record (not `step`; nulls and lists such as `sequence_ids` left out) is a scalar of
that name at the record's step, with the value metrics.jsonl holds (as float32, TensorBoard's scalar type).
`zili report` (zili.report) draws the same records as an HTML page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from zili.errors import UserError
from zili.fsio import atomic_write_text

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb")


def _json_number(key: str, value):
    """Floats rounded to 6 digits (losses kept exact); non-finite ones as null, which JSON can hold."""
    if not isinstance(value, float):
        return value
    if not math.isfinite(value):
        return None
    return value if key in ("loss", "val_loss") else round(value, 6)


def scalars(record: dict) -> dict[str, float]:
    """The fields of a metrics record that are numbers (bools, nulls, lists and `step` left out)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _summary_writer_class():
    """torch's TensorBoard writer class, which needs the `tensorboard` package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("metrics.tensorboard = true needs the tensorboard package — pip install "
                        "'zili[tensorboard]' (or set metrics.tensorboard = false)") from None
    return SummaryWriter


class MetricsLog:
    """Appends records to metrics.jsonl (when `enabled`) and drives the progress bar; with `tensorboard`, also
    writes each record's numbers to RUN_DIR/tensorboard/. Every rank should pass the same `tensorboard`: each
    checks that the package is there (so all of them fail alike), rank 0 (`enabled`) writes."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if tensorboard:
            writer_class = _summary_writer_class()
            if enabled:  # purge_step hides events past `start_step` left by an earlier attempt, as below
                self.writer = writer_class(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if enabled:
            self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (enabled and progress))

    def _truncate_after(self, step: int) -> None:
        """Drop lines past `step` (left by a run that died after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill while it was written
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _json_number(k, v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in scalars(record).items():
                self.writer.add_scalar(key, value, global_step=record["step"])
            self.writer.flush()  # TensorBoard shows a running job's steps as they are logged
        shown = {k: record[k] for k in ("loss", "val_loss", "tokens_per_s", "mfu") if record.get(k) is not None}
        if shown:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order. A line that is not a JSON object with a `step` raises
    UserError naming `file:line` — except an unfinished last line (no newline yet: a running job's)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e.__class__.__name__}) — is {run_dir} a run "
                        "directory (`zili train` writes metrics.jsonl there)?") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise UserError(f"{path}:{number}: damaged line ({e.msg}) — fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number}: not a metrics record (a JSON object with an integer `step`) — "
                            "fix or delete that line")
        records.append(record)
    return records
