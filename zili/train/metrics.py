"""Training metrics: RUN_DIR/metrics.jsonl (rank 0 writes) and a console progress bar.

Each logged step appends one JSON object with at least
`step, loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_gb, skipped_steps`, plus `val_loss` when validation
ran at that step. `skipped_steps` counts the steps of the run so far whose update was skipped because their
loss or gradient norm was not finite; a non-finite figure is written as null. The line for step 0 (validation
of the untrained model) carries `val_loss` and `null` for the training figures. Units: loss in nats/token,
tokens_per_s in tokens per second over all ranks, mfu a fraction of the devices' peak FLOP/s, peak_mem_gb in
1e9 bytes.

MFU = flops_per_token (zili.models.flops) x tokens_per_s / (peak FLOP/s per device x devices).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb")


def _json_number(key: str, value):
    """Floats rounded to 6 digits (losses kept exact); non-finite ones as null, which JSON can hold."""
    if not isinstance(value, float):
        return value
    if not math.isfinite(value):
        return None
    return value if key in ("loss", "val_loss") else round(value, 6)


class MetricsLog:
    """Appends records to metrics.jsonl (when `enabled`) and drives the progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (enabled and progress))

    def _truncate_after(self, step: int) -> None:
        """Drop lines past `step` (left by a run that died after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _json_number(k, v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = {k: record[k] for k in ("loss", "val_loss", "tokens_per_s", "mfu") if record.get(k) is not None}
        if shown:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
