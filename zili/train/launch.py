"""`zili train`: the trainer for the configured objective — `Trainer` (lm, sft) or `RLTrainer` (grpo) — run to the
end, with a sample of the trained model on one process."""

from __future__ import annotations

from pathlib import Path

from zili.config import Config
from zili.parallel import distributed
from zili.train.rl import RLTrainer
from zili.train.trainer import Trainer


def train(cfg: Config) -> Path:
    """Train as configured; print a sample at the end (single process); return the run directory."""
    try:
        trainer = RLTrainer(cfg) if cfg.training.objective == "grpo" else Trainer(cfg)
        run_dir = trainer.run()
        if distributed.is_main():
            print(f"run directory: {run_dir}")
            if cfg.training.sample_tokens and trainer.step == cfg.training.steps:
                if trainer.world_size == 1:
                    print("sample:\n" + trainer.sample())
                else:
                    print(f"sample: run `zili generate {run_dir}` (not generated inside a distributed run)")
        return run_dir
    finally:
        distributed.shutdown()
