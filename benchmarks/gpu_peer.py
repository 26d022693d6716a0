"""The peer of the GPU check: Hugging Face transformers' LlamaForCausalLM trained on a `zili bench` workload's
shape and timed as `zili bench` times zili, so that zili tokens/s ÷ peer tokens/s compares the two on the same
device, the same shape and the same steps.

    python benchmarks/gpu_peer.py [--workload dense-1b] [--device cuda] [--dtype bf16] [--batch B] [--seq T]
                                  [--steps 20] [--warmup 3] [--no-compile] [--json PATH]

What the peer does — the ordinary transformers training loop, with the settings zili's bench uses:

- model: `LlamaForCausalLM(LlamaConfig(...))` with the workload's shape (layers, hidden size, query and KV
  heads, SwiGLU width, vocabulary, RoPE θ, RMSNorm ε, untied head, no biases), built directly on the device
  with transformers' own random initialisation (torch seed 0); parameters in fp32 (the master weights),
  `use_cache=False`, `attn_implementation="sdpa"` (PyTorch's scaled_dot_product_attention, which picks its
  flash or memory-efficient kernel on CUDA);
- compile (unless --no-compile): every decoder layer compiled in place with `nn.Module.compile()` — the same
  granularity as zili's `training.compile = true` (zili/parallel/compile.py); embedding, final norm, head and
  loss run eagerly on both sides;
- step: forward under `torch.autocast(device, torch.bfloat16)` (plain fp32 where zili's accelerator layer
  would compute in fp32, e.g. a CPU without fast bf16 — the same decision for both sides), cross-entropy of
  the logits in fp32 (`F.cross_entropy(logits.float(), targets)`), backward, `clip_grad_norm_(…, 1.0)`,
  fused `torch.optim.AdamW` with zili's optimizer defaults (lr, betas, eps, weight decay — on every parameter,
  where zili exempts norms: the same arithmetic per element), `zero_grad(set_to_none=True)`. Unlike zili's
  step there is no non-finite check;
- process settings: those zili's bench applies (`Accelerator.tune_for_training`: nothing on CUDA, the glibc
  allocator setting on CPU);
- data and timing as `zili bench` (zili/bench/measure.py): one random token batch (torch.Generator seeded 0,
  ids uniform over the vocabulary), `warmup` untimed steps (compilation happens in the first), peak memory
  reset, then `steps` timed steps ending with a device synchronisation.

Output: one JSON object on stdout (and in --json PATH): tokens_per_s, step_s (seconds), tflops and mfu (FLOPs
per token from zili's accountant, peak from zili's chip table — the very figures `zili bench` divides by; mfu
null where zili knows no peak for the chip),
peak_mem_gb (1e9 bytes, the device allocator's peak; on CPU the process's peak resident set), first_loss and
last_loss (nats/token), params (counted on the built model) and zili_params (zili's count for the workload —
equal when the two models have the same shape), and the settings that ran.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    from zili.bench.workloads import WORKLOADS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="dense-1b", choices=list(WORKLOADS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the workload's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the workload's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile each decoder layer (default on)")
    p.add_argument("--json", dest="json_path", help="also write the result here")
    return p.parse_args(argv)


def build_model(args, device: torch.device, compile: bool):
    """LlamaForCausalLM with zili's ModelArgs `args`, fp32 parameters on `device`, layers compiled if asked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tied_embeddings,
        attention_bias=args.qkv_bias, mlp_bias=False, use_cache=False, attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: no host copy of the weights
        model = LlamaForCausalLM(config).float().train()
    if compile:
        for layer in model.model.layers:
            layer.compile()
    return model


def run_peer(workload: str, device: str = "cuda", dtype: str = "bf16", batch: int | None = None,
             seq: int | None = None, steps: int = 20, warmup: int = 3, compile: bool = True) -> dict:
    """Train the peer on `workload` and return the JSON-ready result (see the module doc)."""
    import transformers

    from zili.accel import get_accelerator
    from zili.bench.measure import time_steps
    from zili.bench.workloads import WORKLOADS
    from zili.config import OptimizerConfig
    from zili.models.flops import flops_per_token, param_counts

    if steps < 1 or warmup < 1:
        raise SystemExit("error: need --steps >= 1 and --warmup >= 1")
    w = WORKLOADS[workload]
    batch, seq = batch or w.batch, seq or w.seq_len
    args = replace(w.args, max_seq_len=max(seq, w.args.max_seq_len))  # as zili bench does
    accel = get_accelerator(device)
    compute = accel.compute_dtype(dtype)
    accel.tune_for_training()
    model = build_model(args, accel.device, compile)
    opt = OptimizerConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                  weight_decay=opt.weight_decay, fused=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen).to(accel.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with accel.autocast(compute):
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss, loss, seconds = time_steps(step, steps, warmup, accel)

    tokens_per_s = steps * batch * seq / seconds
    per_token = flops_per_token(args, seq)
    peak = accel.peak_flops(compute)  # NaN where zili does not know the chip's peak: MFU unknown, as in zili bench
    known = math.isfinite(peak)
    return {
        "peer": "transformers LlamaForCausalLM",
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "device": accel.chip_name(),
        "device_type": accel.type,
        "workload": workload,
        "params": sum(p.numel() for p in model.parameters()),
        "zili_params": param_counts(args)["total"],
        "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch": batch,
        "seq_len": seq,
        "dtype": "bf16" if compute == torch.bfloat16 else "fp32",
        "compile": compile,
        "steps": steps,
        "warmup": warmup,
        "first_loss": first_loss,
        "last_loss": float(loss),
        "step_s": seconds / steps,
        "tokens_per_s": tokens_per_s,
        "tflops": per_token * tokens_per_s / 1e12,
        "peak_tflops": peak / 1e12 if known else None,
        "mfu": per_token * tokens_per_s / peak if known else None,
        "peak_mem_gb": accel.peak_memory_gb(),
        "torch": torch.__version__,
    }


def main(argv=None) -> dict:
    opts = parse_args(argv)
    result = run_peer(opts.workload, opts.device, opts.dtype, opts.batch, opts.seq, opts.steps, opts.warmup,
                      opts.compile)
    text = json.dumps(result, indent=1)
    print(text)
    if opts.json_path:
        Path(opts.json_path).write_text(text + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # zili from this checkout, installed or not
    main()
