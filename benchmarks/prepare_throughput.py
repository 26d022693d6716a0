"""Tokens/s of `zili data prepare --workers N` against a plain single-process loop, same files, same run.

    python benchmarks/prepare_throughput.py [--mb 32] [--files 8] [--workers N] [--rounds 3] [--seed 0]

The corpus is generated offline: documents of 10-200 consecutive lines cut at random (from `--seed`) out of
the demo corpus (Shakespeare, see zili/data/demo.py), about `--mb` MB of UTF-8 in `--files` JSONL files
(`{"text": ...}` per line). The tokenizer is the demo's (byte-level BPE, 2,048 tokens), built on first use.

The sides:

- zili: `python -m zili data prepare --input DIR --tokenizer TOK --output OUT --workers N` in a subprocess,
  timed from start to exit (Python start and imports included), with N = `--workers` (default: the command's
  own default, the CPU cores) and with N = 1 (tokenizing in the one process, `encode_batch` in Rust threads);
- loop: in this process, each file line by line: `json.loads`, `Tokenizer.encode` (one document at a time,
  no batching), the ids and EOS appended to an array, written to one file at the end.

Rounds interleave the sides (the order rotating every round) so that machine noise hits all alike; reported
are the median seconds and tokens/s per side and `ratio`, zili with N workers over the loop, tokens/s. The
token streams are compared (`same_tokens`): all sides must produce the same tokens. Nothing here asserts a
time: the output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zili.accel import cpu_model_name  # noqa: E402
from zili.data.demo import demo_dataset, demo_texts  # noqa: E402
from zili.data.prepare import default_workers  # noqa: E402
from zili.data.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(directory: Path, megabytes: float, files: int, seed: int) -> dict:
    """JSONL files `corpus-NN.jsonl` of random runs of demo-corpus lines; returns their size and counts."""
    rng = random.Random(seed)
    texts = [t.splitlines(keepends=True) for t in demo_texts()]
    per_file = megabytes * 1e6 / files
    total_bytes = documents = 0
    for index in range(files):
        written = 0
        with open(directory / f"corpus-{index:02d}.jsonl", "w", encoding="utf-8") as f:
            while written < per_file:
                lines = rng.choice(texts)
                start = rng.randrange(len(lines))
                line = json.dumps({"text": "".join(lines[start:start + rng.randint(10, 200)])}) + "\n"
                f.write(line)
                written += len(line.encode())
                documents += 1
        total_bytes += written
    return {"files": files, "bytes": total_bytes, "documents": documents}


def run_zili(corpus: Path, tokenizer: Path, out: Path, workers: int | None) -> tuple[float, np.ndarray]:
    """Seconds of one `zili data prepare` subprocess and its token stream."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "zili", "data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizer),
           "--output", str(out)] + ([] if workers is None else ["--workers", str(workers)])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]])
    return seconds, tokens


def run_loop(corpus: Path, tokenizer: Tokenizer, out: Path) -> tuple[float, np.ndarray]:
    """Seconds of the plain loop (see the module docstring) and its token stream."""
    start = time.perf_counter()
    ids = array("I")
    eos = tokenizer.eos_id
    for path in sorted(corpus.iterdir()):
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                if text:
                    ids.extend(tokenizer.encode(text))
                    ids.append(eos)
    tokens = np.frombuffer(ids, dtype=np.uint32).astype(np.uint16)
    tokens.tofile(out)
    return time.perf_counter() - start, tokens


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32, help="corpus size in MB (default 32)")
    parser.add_argument("--files", type=int, default=8, help="JSONL files (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="zili's --workers (default: its own default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all sides (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    opts = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # other work on the machine slows every side; recorded, not corrected
    tok_dir = demo_dataset() / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir)
    workers = opts.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="zili-prepare-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        corpus = write_corpus(tmp / "corpus", opts.mb, opts.files, opts.seed)
        sides = {
            f"zili_workers_{workers}": lambda: run_zili(tmp / "corpus", tok_dir, tmp / "out", workers),
            "zili_workers_1": lambda: run_zili(tmp / "corpus", tok_dir, tmp / "out", 1),
            "loop": lambda: run_loop(tmp / "corpus", tokenizer, tmp / "loop.bin"),
        }
        names = list(sides)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        streams: dict[str, np.ndarray] = {}
        for r in range(opts.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                took, streams[name] = sides[name]()
                seconds[name].append(took)
    tokens = int(streams["loop"].size)
    same = all(np.array_equal(streams[name], streams["loop"]) for name in names)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    rate = {name: tokens / median[name] for name in names}
    result = {
        "benchmark": "prepare_throughput",
        "cpu": cpu_model_name(), "cores": os.cpu_count(), "workers": workers, "rounds": opts.rounds,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "corpus": {**corpus, "tokens": tokens, "seed": opts.seed},
        "seconds_median": {k: round(v, 2) for k, v in median.items()},
        "seconds_all": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "tokens_per_s": {k: round(v) for k, v in rate.items()},
        "ratio": round(rate[f"zili_workers_{workers}"] / rate["loop"], 2),
        "ratio_workers_1": round(rate["zili_workers_1"] / rate["loop"], 2),
        "same_tokens": same,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
