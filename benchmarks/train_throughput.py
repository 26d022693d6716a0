"""Training throughput of zili against Hugging Face transformers' Qwen2ForCausalLM, same model, same machine.

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--no-compile] [--allocator tuned|default]
                                          [--dtype auto|bf16|fp32]

Both sides train the same architecture (default: dim 1024, 8 layers, 16 heads, 4 KV heads, SwiGLU 2816,
vocab 8192, q/k/v bias like Qwen2, untied head) on the same token batch (8 x 512), under
`torch.autocast(device, dtype=torch.bfloat16)` (or in plain fp32 with `--dtype fp32`, and with `auto` where
zili's accelerator layer would not use bf16, e.g. a CPU without native bf16 instructions) with fp32 master
weights, clipping the gradient norm to
1.0 and stepping AdamW:

- zili: the model built through `parallelize` and stepped by `train_step` — the very construction and
  step function the trainer runs; unless `--no-compile`, also a second copy with `training.compile = true`.
- transformers: an ordinary loop — forward (attn_implementation="sdpa"), fp32 cross-entropy on the
  logits, backward, `clip_grad_norm_`, `torch.optim.AdamW` with its defaults for the device, zero_grad.

Steps are interleaved (one of each per round, the order rotating every round), so that machine noise hits
every side alike; warm-up rounds (and compilation) are excluded. Reported: median step time and tokens/s
per side, and the speedup as the median over rounds of (transformers step time / zili step time) in the
same round. The glibc allocator setting (`--allocator`) is process-wide, hence the same for both sides.
Nothing here asserts a time: the output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zili.accel import Accelerator, cpu_model_name  # noqa: E402
from zili.config import Config, OptimizerConfig  # noqa: E402
from zili.cpu import tune_allocator  # noqa: E402
from zili.models.args import ModelArgs  # noqa: E402
from zili.models.transformer import Transformer  # noqa: E402
from zili.parallel.apply import parallelize  # noqa: E402
from zili.train.optim import build_optimizer  # noqa: E402
from zili.train.step import lm_loss, train_step  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="measured steps per side (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure zili through compile_model (torch.compile per block); --no-compile skips it")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="'tuned': zili.cpu.tune_allocator() (process-wide, so for both sides)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype of both sides; auto = bf16 where zili would train in it, else fp32")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = PyTorch's default")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tied", action="store_true", help="tie input embedding and output head (both sides)")
    p.add_argument("--no-hf", action="store_true", help="zili only (no transformers needed)")
    return p.parse_args(argv)


def zili_side(args: ModelArgs, device, inputs, targets, autocast, compiled: bool):
    cfg = Config()
    cfg.training.compile = compiled  # what `training.compile = true` does
    with torch.device("meta"):
        meta_model = Transformer(args)
    model = parallelize(meta_model, cfg, device=device, seed=0, loss_fn=lm_loss)  # as the trainer builds it
    optimizers = [build_optimizer(part, cfg.optimizer, device.type) for part in model.parts]

    def step():
        return train_step(model, optimizers, inputs, targets, micro_batch=inputs.shape[0], autocast=autocast,
                          grad_clip=1.0).loss

    return step


def hf_side(args: ModelArgs, device, inputs, targets, autocast):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len, rope_theta=args.rope_theta, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tied_embeddings, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device).train()
    cfg = OptimizerConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)

    def step():
        with autocast():
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def timed(step, device) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = step()
    loss = float(loss)  # waits for the device
    Accelerator(device).synchronize()
    return time.perf_counter() - t0, loss


def summary(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"tokens_per_s": round(tokens / med, 1), "step_s_median": round(med, 4),
            "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4)}


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    allocator = "glibc default"
    if opts.allocator == "tuned":
        allocator = "tuned (mallopt, both sides)" if tune_allocator() else "default (no glibc mallopt)"
    device = torch.device(opts.device)
    args = ModelArgs(n_layers=opts.layers, dim=opts.dim, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     ffn_dim=opts.ffn, vocab_size=opts.vocab, qkv_bias=True, tied_embeddings=opts.tied,
                     rope_theta=1_000_000.0, norm_eps=1e-6, max_seq_len=opts.seq).validate()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    dtype = Accelerator(device).compute_dtype("bf16") if opts.dtype == "auto" else (
        torch.bfloat16 if opts.dtype == "bf16" else torch.float32)
    autocast = lambda: Accelerator(device).autocast(dtype)  # noqa: E731

    sides = {"zili": zili_side(args, device, inputs, targets, autocast, compiled=False)}
    if opts.compile:
        sides["zili_compiled"] = zili_side(args, device, inputs, targets, autocast, compiled=True)
    if not opts.no_hf:
        sides["transformers"] = hf_side(args, device, inputs, targets, autocast)

    first_step_s, losses = {}, {name: [] for name in sides}
    for name, step in sides.items():  # warm-up; the first step of the compiled side includes compilation
        for i in range(opts.warmup):
            seconds, loss = timed(step, device)
            losses[name].append(loss)
            if i == 0:
                first_step_s[name] = round(seconds, 2)

    names = list(sides)
    times = {name: [] for name in names}
    for r in range(opts.steps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, loss = timed(sides[name], device)
            times[name].append(seconds)
            losses[name].append(loss)

    n_tokens = opts.batch * opts.seq
    result: dict = {
        "benchmark": "train_throughput",
        "model": {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                  "n_kv_heads": args.n_kv_heads, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size,
                  "qkv_bias": True, "tied_embeddings": args.tied_embeddings},
        "batch": opts.batch, "seq_len": opts.seq, "tokens_per_step": n_tokens,
        "precision": ("bf16 autocast" if dtype == torch.bfloat16 else "fp32") + ", fp32 master weights",
        "optimizer": "AdamW (zili: build_optimizer, fused; transformers: torch.optim.AdamW defaults)",
        "grad_clip": 1.0, "device": device.type, "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
        "allocator": allocator, "torch": torch.__version__, "python": platform.python_version(),
        "warmup_steps": opts.warmup, "measured_steps": opts.steps, "interleaved": True,
    }
    if not opts.no_hf:
        import transformers

        result["transformers_version"] = transformers.__version__
    for name in names:
        result[name] = summary(times[name], n_tokens)
        result[name]["first_step_s"] = first_step_s.get(name)
        result[name]["loss_first_last"] = [round(losses[name][0], 4), round(losses[name][-1], 4)]
        result[name]["step_s_per_round"] = [round(t, 3) for t in times[name]]
    if "transformers" in times:
        for name in [n for n in names if n.startswith("zili")]:
            per_round = [hf / z for hf, z in zip(times["transformers"], times[name])]
            suffix = name[len("zili"):]
            result["speedup" + suffix] = round(statistics.median(per_round), 3)
            result["speedup" + suffix + "_per_round"] = [round(x, 3) for x in per_round]
    try:
        import resource

        result["peak_rss_gb_all_sides"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    except ImportError:  # not on Windows
        pass
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
