"""Chaos: kill a training run with SIGKILL at random moments — during steps and during checkpoint writes — resume
it each time, and compare its final weights with an uninterrupted run's. Prints one JSON object.

    python benchmarks/chaos.py [--kills 12] [--steps 300] [--seed 0] [--work DIR]

Both runs are `python -m zili train` on the same tiny model and corpus (fp32 on the CPU, one process, a
checkpoint every 5 steps, the demo corpus). The peer is the uninterrupted run, measured in the same session.
The chaotic run is started with `--checkpoint.resume=auto` again and again; after its Python has started and
the run has written a metrics line past the point it resumed from, it is killed either after a random delay
(a kill during steps) or as soon as a checkpoint's temporary directory appears (a kill during a checkpoint
write), alternately. Once `--kills` kills are done it runs to the end. `equal` is true when every weight of the
final checkpoint equals the peer's bit for bit; `kills_during_checkpoint_write` counts the kills that found a
checkpoint being written. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zili.checkpoint import list_checkpoints, read_meta, read_model_tensor  # noqa: E402
from zili.models.args import ModelArgs  # noqa: E402
from zili.models.transformer import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model.n_layers=4", "--model.dim=128", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.ffn_dim=384",
         "--training.seq_len=128", "--training.batch_size=8", "--training.dtype=fp32", "--training.sample_tokens=0",
         "--metrics.progress=false", "--metrics.log_every=1", "--checkpoint.every=5", "--checkpoint.keep=2",
         "--training.eval_every=0", "--checkpoint.resume=auto"]


def command(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "zili", "train", *MODEL, f"--training.steps={steps}", f"--training.run_dir={run_dir}"]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:  # a line being written
        return 0


def writing_checkpoint(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())


def chaotic_run(run_dir: Path, steps: int, kills: int, rng: random.Random, env: dict) -> dict:
    """Run to the end with `kills` SIGKILLs on the way (module doc); counts and the resume points."""
    done, during_write, resumed_from, attempts = 0, 0, [], 0
    while True:
        attempts += 1
        start = last_step(run_dir)
        newest = list_checkpoints(run_dir)
        resumed_from.append(int(newest[-1].name.removeprefix("step-")) if newest else 0)
        proc = subprocess.Popen(command(run_dir, steps), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if done < kills:
            on_write = done % 2 == 1
            delay = rng.uniform(0.05, 1.5)
            moving_since = None
            while proc.poll() is None:
                if last_step(run_dir) > start and moving_since is None:
                    moving_since = time.perf_counter()
                if moving_since is not None and (
                        (on_write and writing_checkpoint(run_dir))
                        or (not on_write and time.perf_counter() - moving_since >= delay)):
                    during_write += writing_checkpoint(run_dir)
                    proc.send_signal(signal.SIGKILL)
                    done += 1
                    break
                time.sleep(0.002)
        _, err = proc.communicate()
        if proc.returncode == 0:
            return {"kills": done, "kills_during_checkpoint_write": during_write, "starts": attempts,
                    "checkpoint_step_at_each_start": resumed_from}
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the chaotic run failed by itself (exit {proc.returncode}):\n{err[-3000:]}")


def final_weights_equal(a: Path, b: Path) -> tuple[bool, int]:
    """Whether every model tensor of run a's newest checkpoint equals run b's, bit for bit; the tensor count."""
    ca, cb = list_checkpoints(a)[-1], list_checkpoints(b)[-1]
    if ca.name != cb.name:
        return False, 0
    args = ModelArgs(**read_meta(ca)["model"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    equal = all(torch.equal(read_model_tensor(ca, k, s), read_model_tensor(cb, k, s)) for k, s in shapes.items())
    return equal, len(shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs before the run may finish (default 12)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of both runs (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--work", default=None, help="directory for the two runs (default: a new temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="zili-chaos-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    peer = subprocess.run(command(work / "uninterrupted", args.steps), env=env, cwd=REPO, capture_output=True,
                          text=True)
    if peer.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{peer.stderr[-3000:]}")
    peer_s = time.perf_counter() - began
    began = time.perf_counter()
    chaos = chaotic_run(work / "chaotic", args.steps, args.kills, random.Random(args.seed), env)
    chaos_s = time.perf_counter() - began
    equal, tensors = final_weights_equal(work / "chaotic", work / "uninterrupted")
    print(json.dumps({"equal": equal, "tensors_compared": tensors, "steps": args.steps, **chaos,
                      "uninterrupted_s": round(peer_s, 1), "chaotic_s": round(chaos_s, 1),
                      "time_ratio": round(chaos_s / peer_s, 2), "work": str(work)}, indent=1))
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
