"""Training throughput of zili against Hugging Face transformers, same model, same machine: a dense decoder
against Qwen2ForCausalLM (the default case) or a mixture of experts against Qwen3MoeForCausalLM (`--case moe`).

    python benchmarks/train_throughput.py [--case dense|moe] [--steps 6] [--warmup 2] [--no-compile]
                                          [--allocator tuned|default] [--dtype auto|bf16|fp32] [--profile]

Both sides train the same architecture on the same token batch (8 x 512), under
`torch.autocast(device, dtype=torch.bfloat16)` (or in plain fp32 with `--dtype fp32`, and with `auto` where
zili's accelerator layer would not use bf16, e.g. a CPU without native bf16 instructions) with fp32 master
weights, clipping the gradient norm to 1.0 and stepping AdamW. The architectures:

- dense (default): dim 1024, 8 layers, 16 heads, 4 KV heads, SwiGLU 2816, vocab 8192, q/k/v bias like Qwen2,
  untied head;
- moe: Qwen3-MoE's block at dim 1024, 8 layers, 16 heads of 64, 4 KV heads, no q/k/v bias, per-head q/k RMSNorm
  (zili's `qk_norm`), vocab 8192, untied head; every block an expert layer of 32 SwiGLU experts of width 512,
  top 4 by softmax with the kept weights renormalised (norm_topk_prob), no shared expert. At start zili's initial
  weights are copied into the transformers model (the stacked experts `w_gate`/`w_up` (E, ffn, dim) and `w_down`
  (E, dim, ffn) into transformers 5's `mlp.experts.gate_up_proj` (E, 2 ffn, dim) and `down_proj` (E, dim, ffn)), and
  the largest fp32 logit difference of the two on one sequence is reported (`same_function_check`): both
  sides then train the same function from the same weights. transformers runs its default experts
  implementation (grouped_mm where torch has it; `--hf-experts eager` for its loop over experts).

The sides:

- zili: the model built through `parallelize` and stepped by `train_step` — the very construction and
  step function the trainer runs; unless `--no-compile`, also a second copy with `training.compile = true`.
- transformers: an ordinary loop — forward (attn_implementation="sdpa"), fp32 cross-entropy on the
  logits, backward, `clip_grad_norm_`, `torch.optim.AdamW` with its defaults for the device, zero_grad.

Steps are interleaved (one of each per round, the order rotating every round), so that machine noise hits
every side alike; warm-up rounds (and compilation) are excluded. Reported: median step time and tokens/s
per side, and the speedup as the median over rounds of (transformers step time / zili step time) in the
same round. The glibc allocator setting (`--allocator`) is process-wide, hence the same for both sides.
`--profile` adds one more eager zili step under torch.profiler and lists the ops with the most self time.
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
from zili.interop.hf import hf_name  # noqa: E402
from zili.models.args import ModelArgs  # noqa: E402
from zili.models.flops import flops_per_token, matmul_params, param_counts  # noqa: E402
from zili.models.transformer import Transformer  # noqa: E402
from zili.parallel.apply import parallelize  # noqa: E402
from zili.train.optim import build_optimizer  # noqa: E402
from zili.train.step import lm_loss, train_step  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("dense", "moe"), default="dense",
                   help="dense: against Qwen2ForCausalLM (the default); moe: a mixture of experts against "
                        "Qwen3MoeForCausalLM")
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
    p.add_argument("--ffn", type=int, default=2816, help="dense case: SwiGLU width")
    p.add_argument("--experts", type=int, default=32, help="moe case: routed experts per layer")
    p.add_argument("--top-k", type=int, default=4, help="moe case: experts per token")
    p.add_argument("--expert-ffn", type=int, default=512, help="moe case: SwiGLU width of each expert")
    p.add_argument("--hf-experts", default="default",
                   help="moe case: transformers' experts_implementation ('default' = what transformers picks, "
                        "grouped_mm where torch has it; 'eager' = its loop over experts; 'batched_mm')")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tied", action="store_true", help="tie input embedding and output head (both sides)")
    p.add_argument("--no-hf", action="store_true", help="zili only (no transformers needed)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, one more eager zili step under torch.profiler: top ops in the JSON")
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

    step.model = model.parts[0]  # the Transformer (one part: no pipeline here)
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
    return hf_loop(model, inputs, targets, autocast)


def moe_args(opts: argparse.Namespace) -> ModelArgs:
    """The moe case's architecture: Qwen3-MoE's block (GQA, no q/k/v bias, per-head q/k RMSNorm where zili has
    it), softmax top-k routing with renormalised weights, every block an expert layer, no shared expert."""
    return ModelArgs(n_layers=opts.layers, dim=opts.dim, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     ffn_dim=opts.ffn, vocab_size=opts.vocab, qkv_bias=False, tied_embeddings=opts.tied,
                     rope_theta=1_000_000.0, norm_eps=1e-6, max_seq_len=opts.seq, n_routed_experts=opts.experts,
                     n_shared_experts=0, top_k=opts.top_k, moe_ffn_dim=opts.expert_ffn, n_dense_layers=0,
                     score_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, qk_norm=True).validate()


def hf_moe_model(args: ModelArgs, device, experts_implementation: str = "default"):
    """transformers' Qwen3MoeForCausalLM of the same shape (its own random initialisation), training mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    extra = {} if experts_implementation == "default" else {"experts_implementation": experts_implementation}
    config = Qwen3MoeConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tied_embeddings, attention_bias=False, num_experts=args.n_routed_experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_ffn_dim, norm_topk_prob=args.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False, attn_implementation="sdpa", **extra,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    return model.to(device).train()


@torch.no_grad()
def copy_to_hf(zili_model: torch.nn.Module, hf_model: torch.nn.Module) -> None:
    """zili's weights into the transformers model. Stacked experts: zili's `w_gate`, `w_up` (E, ffn, dim) become
    transformers 5's `gate_up_proj` (E, 2 ffn, dim; gate rows first), `w_down` (E, dim, ffn) its `down_proj`."""
    hf = dict(hf_model.named_parameters())
    done = set()
    for name, p in zili_model.named_parameters():
        if name.endswith("experts.w_up"):
            continue
        if name.endswith("experts.w_gate"):
            prefix = name[: -len("w_gate")]
            up = zili_model.get_parameter(prefix + "w_up")
            target, value = hf_name(prefix + "gate_up_proj"), torch.cat([p, up], dim=1)
        elif name.endswith("experts.w_down"):
            target, value = hf_name(name[: -len("w_down")] + "down_proj"), p
        else:
            target, value = hf_name(name), p
        if target not in hf:
            raise ValueError(f"transformers has no {target} (for zili's {name}): the moe case maps transformers "
                             "5's stacked experts (mlp.experts.gate_up_proj, down_proj)")
        if hf[target].shape != value.shape:
            raise ValueError(f"{name} {tuple(value.shape)} does not fit {target} {tuple(hf[target].shape)}")
        hf[target].copy_(value)
        done.add(target)
    if missing := sorted(set(hf) - done - ({"lm_head.weight"} if zili_model.args.tied_embeddings else set())):
        raise ValueError(f"transformers parameters left at their own initial values: {missing}")


@torch.no_grad()
def max_logit_difference(zili_model: torch.nn.Module, hf_model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """Both models' fp32 logits (no autocast) on `tokens`: the largest absolute difference and, for scale, the
    largest absolute logit. The MoE layers' load counters are left as they were (evaluation mode)."""
    zili_model.eval()
    hf_model.eval()
    try:
        a = zili_model(tokens).float()
        b = hf_model(input_ids=tokens).logits.float()
    finally:
        zili_model.train()
        hf_model.train()
    return {"max_abs_logit_diff_fp32": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "tokens": list(tokens.shape)}


def hf_loop(model, inputs, targets, autocast):
    """An ordinary transformers training step: forward, fp32 cross-entropy, backward, clip, AdamW, zero_grad."""
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


def profile_step(step, device, top: int = 25) -> dict:
    """One step under torch.profiler: its seconds and the ops with the most self time (CPU or device)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds, _ = timed(step, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return {"step_s": round(seconds, 3), "sort_by": key,
            "top_ops": [{"op": e.key, "calls": e.count, "self_s": round(getattr(e, key) / 1e6, 4),
                         "share": round(getattr(e, key) / total, 4)} for e in events[:top]]}


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
    moe = opts.case == "moe"
    if moe:
        args = moe_args(opts)
    else:
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
    check = None
    if not opts.no_hf and moe:  # same weights on both sides, checked to compute the same function
        hf_model = hf_moe_model(args, device, opts.hf_experts)
        copy_to_hf(sides["zili"].model, hf_model)
        check = max_logit_difference(sides["zili"].model, hf_model, inputs[:1])
        check["experts_implementation"] = hf_model.config._experts_implementation
        sides["transformers"] = hf_loop(hf_model, inputs, targets, autocast)
    elif not opts.no_hf:
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
    if moe:
        model = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                 "head_dim": args.head_dim, "n_routed_experts": args.n_routed_experts, "top_k": args.top_k,
                 "moe_ffn_dim": args.moe_ffn_dim, "n_shared_experts": 0, "n_dense_layers": 0,
                 "routing": "softmax, top-k weights renormalised (norm_topk_prob)", "vocab_size": args.vocab_size,
                 "qkv_bias": False, "tied_embeddings": args.tied_embeddings,
                 "qk_norm": args.qk_norm,
                 "params_total": param_counts(args)["total"], "params_active_matmul": matmul_params(args),
                 "flops_per_token": flops_per_token(args, opts.seq)}
    else:
        model = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                 "n_kv_heads": args.n_kv_heads, "ffn_dim": args.ffn_dim, "vocab_size": args.vocab_size,
                 "qkv_bias": True, "tied_embeddings": args.tied_embeddings}
    result: dict = {
        "benchmark": "train_throughput" if not moe else "train_throughput_moe",
        "model": model,
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
    if moe:
        result["peer"] = "transformers Qwen3MoeForCausalLM"
    if check is not None:
        result["same_function_check"] = check
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
    if opts.profile:
        result["profile_zili"] = profile_step(sides["zili"], device)
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
