"""The reasoning demo (docs/post-training.md): a task from a seed, SFT of a tiny model on worked answers, then GRPO
with an exact-answer reward — held-out accuracy after each, with binomial standard errors. Prints one JSON object.

    python benchmarks/reasoning_demo.py [--work DIR] [--seed N]        (make reasoning-demo)

Every stage is the command a user runs (`python -m zili ...`), with the recipes configs/reasoning-demo-sft.toml
and configs/reasoning-demo-grpo.toml: the task and tokenizer (zili.data.arithmetic), `zili data prepare --format
chat`, `zili train` with training.objective=sft, then with training.objective=grpo from that run. The held-out
accuracy is GRPO's `val_accuracy`: at step 0 the fine-tuned model's, at the end the reinforced one's, on the same
held-out prompts (greedy). The gain is reported in standard errors of the difference of two independent binomial
proportions, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zili.config import load_config
from zili.data.arithmetic import HELDOUT_FILE, RL_FILE, SFT_FILE, TOKENIZER_DIR, write_task

REPO = Path(__file__).resolve().parents[1]


def zili(*args: str) -> float:
    """Run `python -m zili ARGS` (output shown); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zili", *map(str, args)], check=True, cwd=REPO)
    return time.perf_counter() - start


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="directory for the task, data and runs (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task (default 0)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="zili-reasoning-demo-"))
    started = time.perf_counter()
    task = write_task(work / "task", seed=args.seed, digits=2)
    times = {"prepare_s": zili("data", "prepare", "--format", "chat", "--input", task / SFT_FILE, "--tokenizer",
                               task / TOKENIZER_DIR, "--output", work / "sft-data")}
    times["sft_s"] = zili("train", "--config", REPO / "configs" / "reasoning-demo-sft.toml",
                          f"--data.dataset={work / 'sft-data'}", f"--training.run_dir={work / 'sft'}")
    times["grpo_s"] = zili("train", "--config", REPO / "configs" / "reasoning-demo-grpo.toml",
                           f"--model.init=run:{work / 'sft'}", f"--rl.prompts={task / RL_FILE}",
                           f"--rl.eval_prompts={task / HELDOUT_FILE}", f"--training.run_dir={work / 'grpo'}")
    grpo = records(work / "grpo")
    limit = load_config(REPO / "configs" / "reasoning-demo-grpo.toml").rl.eval_limit
    n = min(limit, len((task / HELDOUT_FILE).read_text().splitlines()))
    before = next(r["val_accuracy"] for r in grpo if r["step"] == 0)
    after = grpo[-1]["val_accuracy"]
    se = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731
    diff_se = math.sqrt(se(before) ** 2 + se(after) ** 2)
    print(json.dumps({
        "task": "2-digit addition, worked answers", "heldout_prompts": n,
        "accuracy_after_sft": before, "se_after_sft": se(before),
        "accuracy_after_grpo": after, "se_after_grpo": se(after),
        "gain": after - before, "gain_in_se": (after - before) / diff_se if diff_se else None,
        "grpo_steps": grpo[-1]["step"], "train_reward_first": grpo[1]["reward_mean"],
        "train_reward_last": grpo[-1]["reward_mean"], **times,
        "total_s": time.perf_counter() - started, "work": str(work),
    }, indent=1))


if __name__ == "__main__":
    main()
