"""Measure one workload on this device: tokens/s, achieved TFLOP/s, MFU, peak memory, A100 ratio.

A step is the trainer's own (`zili.train.step.train_step`: bf16 autocast, fp32 master weights, fused AdamW
where available, gradient clipping). Warm-up steps (and compilation, with `compile`) are excluded; the
timed steps end with a device synchronisation. FLOPs per token come from the one accountant
(`zili.models.flops`), peaks from the chip table (`zili.accel`).

`a100_ratio` = tokens/s here ÷ the tokens/s an A100-80GB reaches on the same workload at
`A100_REFERENCE_MFU` of its bf16 peak (chip table): 1.0 means "as fast as a well-run A100".
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from zili.accel import chip_row_for, get_accelerator, load_chips, tune_cpu_allocator
from zili.bench.workloads import WORKLOADS
from zili.config import OptimizerConfig
from zili.errors import UserError
from zili.models.flops import flops_per_token, param_counts
from zili.models.transformer import Transformer
from zili.train.optim import build_optimizer
from zili.train.step import train_step

A100_REFERENCE_MFU = 0.5  # dense bf16 LLM training on A100s commonly reaches 0.4-0.55 (Megatron-LM, PaLM papers)


def run_bench(workload: str, steps: int = 10, warmup: int = 2, device: str = "auto", dtype: str = "bf16",
              batch: int | None = None, seq: int | None = None, compile: bool = False) -> dict:
    """Measure `workload`; return the JSON-ready result."""
    if workload not in WORKLOADS:
        raise UserError(f"unknown workload {workload!r} — choose one of {', '.join(WORKLOADS)}")
    if steps < 1 or warmup < 0 or (batch is not None and batch < 1) or (seq is not None and seq < 2):
        raise UserError("need --steps >= 1, --warmup >= 0, --batch >= 1 and --seq >= 2")
    w = WORKLOADS[workload]
    batch, seq = batch or w.batch, seq or w.seq_len
    args = replace(w.args, max_seq_len=max(seq, w.args.max_seq_len))
    accel = get_accelerator(device)
    compute = accel.compute_dtype(dtype)
    if accel.type == "cpu":
        tune_cpu_allocator()
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=accel.device)
    model.init_weights(seed=0)
    if compile:
        from zili.parallel.compile import compile_model

        compile_model(model)
    optimizer = build_optimizer(model, OptimizerConfig(), accel.type)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen).to(accel.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        return train_step(model, optimizer, inputs, targets, micro_batch=batch,
                          autocast=lambda: accel.autocast(compute), grad_clip=1.0)

    for _ in range(warmup):
        step()
    accel.synchronize()
    accel.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = step()
    accel.synchronize()
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise UserError(f"the loss became {float(loss)} — the device's {dtype} arithmetic is not usable here")

    tokens_per_s = steps * batch * seq / seconds
    per_token = flops_per_token(args, seq)
    peak = accel.peak_flops(compute)
    row = chip_row_for(accel.chip_name())
    a100 = load_chips()["a100-80gb"]["bf16_tflops"] * 1e12 * A100_REFERENCE_MFU / per_token
    return {
        "device": accel.chip_name(),
        "device_type": accel.type,
        "chip": row["name"] if row else ("cpu" if accel.type == "cpu" else "unknown"),
        "workload": workload,
        "params": param_counts(args)["total"],
        "batch": batch,
        "seq_len": seq,
        "dtype": dtype,
        "compile": compile,
        "steps": steps,
        "warmup": warmup,
        "step_s": seconds / steps,
        "tokens_per_s": tokens_per_s,
        "tflops": per_token * tokens_per_s / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": per_token * tokens_per_s / peak,
        "peak_mem_gb": accel.peak_memory_gb(),
        "a100_ratio": tokens_per_s / a100,
        "a100_reference_mfu": A100_REFERENCE_MFU,
        "torch": torch.__version__,
    }
