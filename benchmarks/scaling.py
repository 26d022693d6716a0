"""Data/tensor/pipeline/context/expert-parallel scaling on one machine: `zili train` on 1 rank against 2 ranks.

    python benchmarks/scaling.py [--steps 20] [--layouts fsdp,tp,pp,cp,ep1,ep2] [--rounds 1] [--dtype bf16]

Each measurement is a real `zili train` (the 2-rank ones launched by torchrun, gloo on CPU) of the same
model on the same global batch (strong scaling), on a corpus prepared here from the Python standard
library's sources (nothing is downloaded). tokens/s is read from the runs' metrics.jsonl — the trainer's
own figure, over all ranks, excluding evaluation and checkpointing — as the median of the logged intervals
after the first (warm-up). The 1-rank run gets all CPU threads, each of the 2 ranks half of them, so the
ratio shows what parallelism costs or gains for the same hardware. Rounds alternate 1-rank and 2-rank
runs, so that machine drift hits both. Prints one JSON object; asserts nothing.

`ep1` and `ep2` train a mixture-of-experts model of the same width (the `tiny-moe` preset's routing: 16 experts,
top 4 of them by grouped sigmoid scores, a shared expert, a dense first block) on 2 ranks without and with
expert parallelism, against its own 1-rank run; the routing is the model's own (natural, not forced balance),
and the JSON gives each MoE run's median expert load (busiest expert's tokens / the mean, from metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

LAYOUTS = {  # name: (model, 2-rank layout)
    "fsdp": ("dense", ["--parallelism.dp_shard=2"]),
    "tp": ("dense", ["--parallelism.tp=2"]),
    "pp": ("dense", ["--parallelism.pp=2", "--parallelism.pp_microbatches=4"]),
    "cp": ("dense", ["--parallelism.cp=2", "--parallelism.dp_shard=1"]),
    "ep1": ("moe", ["--parallelism.dp_shard=2"]),
    "ep2": ("moe", ["--parallelism.dp_shard=2", "--parallelism.ep=2"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--log-every", type=int, default=4, help="steps per logged (timed) interval")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"2-rank layouts to measure: {','.join(LAYOUTS)}")
    p.add_argument("--rounds", type=int, default=1, help="repeat (1 rank, 2 ranks ...) this many times")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads shared by the ranks")
    return p.parse_args(argv)


def prepare_corpus(root: Path) -> Path:
    from zili.data.prepare import prepare
    from zili.data.tokenizer import train_bpe

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:120]
    train_bpe((f.read_text(errors="replace") for f in files), 4096).save(root / "tok")
    prepare(files, root / "tok", root / "data")
    return root / "data"


def model_flags(model: str, opts) -> list[str]:
    """The dense model of the given size, or the mixture-of-experts one (experts half the dense width)."""
    flags = [f"--model.dim={opts.dim}", f"--model.n_layers={opts.layers}", f"--model.n_heads={opts.dim // 64}",
             f"--model.n_kv_heads={max(1, opts.dim // 128)}", f"--model.ffn_dim={opts.dim * 8 // 3 // 64 * 64}"]
    return (["--model.preset=tiny-moe", f"--model.moe_ffn_dim={opts.dim // 2}"] if model == "moe" else []) + flags


def train(root: Path, name: str, ranks: int, layout: list[str], dataset: Path, opts) -> tuple[float, float | None]:
    """(tokens/s of one run — median of the logged intervals after the first —, median expert load or None)."""
    run_dir = root / name
    args = ["train", f"--data.dataset={dataset}", f"--training.run_dir={run_dir}", f"--training.steps={opts.steps}",
            f"--training.batch_size={opts.batch}", f"--training.seq_len={opts.seq}", f"--training.dtype={opts.dtype}",
            "--model.tied_embeddings=false", f"--metrics.log_every={opts.log_every}", "--training.eval_every=0",
            "--metrics.progress=false", "--training.sample_tokens=0", *layout]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, opts.threads // ranks)), "TOKENIZERS_PARALLELISM": "false",
           "ZILI_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if ranks == 1:
        cmd = [sys.executable, "-m", "zili", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "zili", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    loads = [r["expert_load"] for r in records if "expert_load" in r]
    return statistics.median(rates[1:] or rates), statistics.median(loads) if loads else None


def main(argv=None) -> None:
    opts = parse_args(argv)
    import torch

    from zili.accel import cpu_model_name

    layouts = [name.strip() for name in opts.layouts.split(",") if name.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = prepare_corpus(root)
        models = sorted({LAYOUTS[name][0] for name in layouts})
        single = {model: f"1 rank, {model}" for model in models}
        rates: dict[str, list[float]] = {**{single[m]: [] for m in models}, **{f"2 ranks, {n}": [] for n in layouts}}
        loads: dict[str, list[float]] = {}
        for r in range(opts.rounds):
            runs = [(single[m], 1, model_flags(m, opts)) for m in models]
            runs += [(f"2 ranks, {n}", 2, model_flags(LAYOUTS[n][0], opts) + LAYOUTS[n][1]) for n in layouts]
            for key, ranks, flags in runs:
                rate, load = train(root, f"{key.replace(', ', '-').replace(' ', '')}-{r}", ranks, flags, dataset, opts)
                rates[key].append(rate)
                if load is not None:
                    loads.setdefault(key, []).append(load)
    model_of = {**{single[m]: m for m in models}, **{f"2 ranks, {n}": LAYOUTS[n][0] for n in layouts}}
    base = {key: statistics.median(rates[single[model_of[key]]]) for key in rates}  # the same model on 1 rank
    result = {
        "benchmark": "scaling",
        "machine": {"cpu": cpu_model_name(), "threads": opts.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": {"dim": opts.dim, "layers": opts.layers, "seq_len": opts.seq, "global_batch": opts.batch,
                  "dtype": opts.dtype, "steps": opts.steps},
        "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "ratio_to_1_rank": {k: round(statistics.median(v) / base[k], 3) for k, v in rates.items()},
        "expert_load": {k: round(statistics.median(v), 3) for k, v in loads.items()},
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
