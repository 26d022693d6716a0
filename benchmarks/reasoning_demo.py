"""The reasoning demo (docs/post-training.md): SFT of a tiny model on a sloppy teacher's sums, then GRPO.

A task from a seed, SFT on the teacher's worked answers, then GRPO with an exact-answer reward — held-out accuracy
after each, with binomial standard errors. Prints one JSON object.

    python benchmarks/reasoning_demo.py [--work DIR] [--seed N] [--slip P]        (make reasoning-demo)

The teacher (zili.data.arithmetic, `slip`) drops each carry it owes with probability P (0.6): its worked answers
are right on sums without a carry and mostly wrong on the others, so the fine-tuned model imitates the mistake —
and its greedy answer to a sum with a carry is wrong, while some of its sampled answers are right. GRPO, rewarded
for the true sum only, has to learn what the demonstrations got wrong: reinforcement learning with a verifiable
reward improving beyond imperfect demonstrations. `--slip 0` gives a flawless teacher (then the fine-tuned model
is near its ceiling and GRPO has little to add; BENCHMARKS.md, "Reasoning demo").

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
SLIP = 0.6  # the teacher's chance of dropping a carry (module doc)


def zili(*args: str) -> float:
    """Run `python -m zili ARGS` (output shown); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zili", *map(str, args)], check=True, cwd=REPO)
    return time.perf_counter() - start


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def teacher_accuracy(sft_file: Path) -> float:
    """The share of the fine-tuning conversations whose stated sum is the true one."""
    right = total = 0
    for line in sft_file.read_text().splitlines():
        user, assistant = (m["content"] for m in json.loads(line)["messages"])
        a, b = (int(x) for x in user.removeprefix("What is ").removesuffix("?").split(" + "))
        right += assistant.rsplit("Answer: ", 1)[1] == str(a + b)
        total += 1
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="directory for the task, data and runs (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task (default 0)")
    parser.add_argument("--slip", type=float, default=SLIP,
                        help=f"the teacher's chance of dropping a carry it owes (default {SLIP}; 0 = flawless)")
    args = parser.parse_args()
    if not 0 <= args.slip <= 1:
        parser.error(f"--slip is a probability, got {args.slip}")
    work = Path(args.work or tempfile.mkdtemp(prefix="zili-reasoning-demo-"))
    started = time.perf_counter()
    task = write_task(work / "task", seed=args.seed, digits=2, slip=args.slip)
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
        "task": "2-digit addition, worked answers", "teacher_slip": args.slip,
        "teacher_accuracy": teacher_accuracy(task / SFT_FILE), "heldout_prompts": n,
        "accuracy_after_sft": before, "se_after_sft": se(before),
        "accuracy_after_grpo": after, "se_after_grpo": se(after),
        "gain": after - before, "gain_in_se": (after - before) / diff_se if diff_se else None,
        "grpo_steps": grpo[-1]["step"], "train_reward_first": grpo[1]["reward_mean"],
        "train_reward_last": grpo[-1]["reward_mean"], **times,
        "total_s": time.perf_counter() - started, "work": str(work),
    }, indent=1))


if __name__ == "__main__":
    main()
