"""What a checkpoint costs the training loop: synchronous saves against background ones (`checkpoint.async_save`),
against a peer with no intermediate save, same model, same steps, same process. Prints one JSON object.

    python benchmarks/checkpoint_cost.py [--steps 24] [--every 4] [--dim 512] [--layers 8] [--rounds 1]

Each side is the trainer's own loop (`Trainer.run`, as `zili train` runs it) on the demo corpus, fp32:
- none: no checkpoint but the final one;
- sync: a checkpoint every `--every` steps, written before training goes on (DCP save, manifest, rename);
- async: the same checkpoints, staged in host memory and written in the background.
Every side ends with the same final save (the async side waits for it), so the difference in wall time between a
side and `none`, divided by its number of intermediate saves, is what one save costs the loop (`cost_per_save_s`,
seconds). Rounds run the three sides in a rotating order. Where the background writer shares the cores with the
training (a CPU run), it slows the steps it overlaps: that is counted, as it should be. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zili.accel import cpu_model_name  # noqa: E402
from zili.checkpoint import list_checkpoints  # noqa: E402
from zili.config import load_config  # noqa: E402
from zili.models.flops import param_counts  # noqa: E402
from zili.train.trainer import Trainer  # noqa: E402

SIDES = ("none", "sync", "async")


def run(side: str, work: Path, args) -> tuple[float, Trainer]:
    overrides = [("model.dim", args.dim), ("model.n_layers", args.layers), ("model.n_heads", 8),
                 ("model.n_kv_heads", 4), ("model.ffn_dim", args.dim * 3), ("training.seq_len", 256),
                 ("training.batch_size", 4), ("training.dtype", "fp32"), ("training.steps", args.steps),
                 ("training.eval_every", 0), ("training.sample_tokens", 0), ("metrics.progress", "false"),
                 ("metrics.log_every", args.steps), ("checkpoint.keep", 2),
                 ("checkpoint.every", 0 if side == "none" else args.every),
                 ("checkpoint.async_save", "true" if side == "async" else "false"),
                 ("training.run_dir", str(work / side))]
    cfg = load_config(None, [(k, str(v)) for k, v in overrides])
    trainer = Trainer(cfg)
    began = time.perf_counter()
    trainer.run()
    return time.perf_counter() - began, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zili-checkpoint-cost-"))
    times = {side: [] for side in SIDES}
    trainer = None
    try:
        run("none", work / "warmup", argparse.Namespace(**{**vars(args), "steps": 2}))  # imports, peak probe
        for r in range(args.rounds):
            for side in SIDES[r % 3:] + SIDES[: r % 3]:
                seconds, trainer = run(side, work / f"round{r}", args)
                times[side].append(seconds)
        checkpoint_dir = list_checkpoints(work / "round0" / "sync")[-1]
        checkpoint_bytes = sum(f.stat().st_size for f in checkpoint_dir.iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    saves = args.steps // args.every - (1 if args.steps % args.every == 0 else 0)  # the final save is in every side
    median = {side: statistics.median(v) for side, v in times.items()}
    print(json.dumps({
        "model_params": param_counts(trainer.args)["total"], "checkpoint_mb": round(checkpoint_bytes / 1e6, 1),
        "steps": args.steps, "intermediate_saves": saves, "rounds": args.rounds,
        "wall_s": {k: round(v, 2) for k, v in median.items()},
        "step_s_no_save": round(median["none"] / args.steps, 3),
        "cost_per_save_s": {side: round((median[side] - median["none"]) / saves, 3) for side in ("sync", "async")},
        "async_over_sync_cost": round((median["async"] - median["none"]) / max(median["sync"] - median["none"], 1e-9),
                                      3),
        "device": cpu_model_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
    }, indent=1))


if __name__ == "__main__":
    main()
