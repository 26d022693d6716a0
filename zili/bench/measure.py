"""Measure one workload on this device: tokens/s, achieved TFLOP/s, MFU, peak memory, A100 ratio.

A step is the trainer's own: the model is built through `zili.parallel.apply.parallelize` and stepped by
`zili.train.step.train_step` exactly as `zili train` does (bf16 autocast, fp32 master weights, fused AdamW
where available, gradient clipping, non-finite steps skipped). Warm-up steps (and compilation, with `compile`)
are excluded; the timed steps end with a device synchronisation. FLOPs per token come from the one accountant
(`zili.models.flops`), peaks from the chip table (`zili.accel`); on an accelerator the table lacks, `peak_tflops` and
`mfu` are null (unknown) rather than measured against a probe that would overstate MFU.

`a100_ratio` = tokens/s here ÷ the tokens/s an A100-80GB reaches on the same workload at
`A100_REFERENCE_MFU` of its bf16 peak (chip table): 1.0 means "as fast as a well-run A100".
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from zili.accel import get_accelerator, load_chips
from zili.bench.workloads import WORKLOADS
from zili.config import Config
from zili.data.loader import Loader, PackedDataset
from zili.errors import UserError
from zili.models.flops import flops_per_token, param_counts
from zili.models.transformer import Transformer
from zili.parallel.apply import parallelize
from zili.train.optim import build_optimizer
from zili.train.step import lm_loss, train_step

A100_REFERENCE_MFU = 0.5  # dense bf16 LLM training on A100s commonly reaches 0.4-0.55 (Megatron-LM, PaLM papers)


def time_steps(step, steps: int, warmup: int, accel) -> tuple[float, torch.Tensor, float]:
    """Run `step()` (returns the loss) `warmup` times untimed — at least once: the first step's loss is returned —
    then reset the peak memory and time `steps` more, between device synchronisations. Returns (first loss,
    last loss as a device tensor, seconds of the timed steps). zili bench and its peers measure alike."""
    first_loss = float(step())
    for _ in range(warmup - 1):
        step()
    accel.synchronize()
    accel.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    accel.synchronize()
    return first_loss, loss, time.perf_counter() - start


def run_bench(workload: str, steps: int = 10, warmup: int = 2, device: str = "auto", dtype: str = "bf16",
              batch: int | None = None, seq: int | None = None, compile: bool = False, seed: int = 0,
              data: str | None = None) -> dict:
    """Measure `workload` (initial weights from `seed`, as `training.seed`); return the JSON-ready result,
    `first_loss` being the loss of the first (warm-up) step. Every step trains on one batch: random tokens,
    or with `data` (a `zili data prepare` directory) the first batch `zili train` would draw from it with
    the same seed, batch and sequence length."""
    if workload not in WORKLOADS:
        raise UserError(f"unknown workload {workload!r} — choose one of {', '.join(WORKLOADS)}")
    if steps < 1 or warmup < 0 or (batch is not None and batch < 1) or (seq is not None and seq < 2):
        raise UserError("need --steps >= 1, --warmup >= 0, --batch >= 1 and --seq >= 2")
    w = WORKLOADS[workload]
    batch, seq = batch or w.batch, seq or w.seq_len
    args = replace(w.args, max_seq_len=max(seq, w.args.max_seq_len))
    accel = get_accelerator(device)
    compute = accel.compute_dtype(dtype)
    accel.tune_for_training()
    cfg = Config()
    cfg.training.compile = compile
    with torch.device("meta"):
        meta_model = Transformer(args)
    model = parallelize(meta_model, cfg, device=accel.device, seed=seed, compute_dtype=compute, loss_fn=lm_loss)
    optimizers = [build_optimizer(part, cfg.optimizer, accel.type) for part in model.parts]
    if data:
        dataset = PackedDataset(Path(data))
        if dataset.vocab_size > args.vocab_size:
            raise UserError(f"{data} has a {dataset.vocab_size}-token vocabulary but {workload} only {args.vocab_size} "
                            "embeddings — prepare the data with a smaller tokenizer")
        loader = Loader(dataset, seq, batch, seed, cfg.data.val_fraction, rank=0, world_size=1)
        inputs, targets = (accel.to_device(t) for t in loader.next_batch())
    else:
        gen = torch.Generator().manual_seed(0)
        tokens = accel.to_device(torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        return train_step(model, optimizers, inputs, targets, micro_batch=batch,
                          autocast=lambda: accel.autocast(compute), grad_clip=cfg.training.grad_clip).loss

    first_loss, loss, seconds = time_steps(step, steps, warmup, accel)
    if not torch.isfinite(loss):
        raise UserError(f"the loss became {float(loss)} — the device's {dtype} arithmetic is not usable here")

    tokens_per_s = steps * batch * seq / seconds
    per_token = flops_per_token(args, seq)
    peak = accel.peak_flops(compute)  # NaN: unknown (an accelerator the chip table lacks; it warned)
    known = math.isfinite(peak)
    row = accel.chip_row()
    a100 = load_chips()["a100-80gb"]["bf16_tflops"] * 1e12 * A100_REFERENCE_MFU / per_token
    return {
        "device": accel.chip_name(),
        "device_type": accel.type,
        "chip": row["name"] if row else ("cpu" if accel.type == "cpu" else "unknown"),
        "workload": workload,
        "params": param_counts(args)["total"],
        "batch": batch,
        "seq_len": seq,
        "dtype": "bf16" if compute == torch.bfloat16 else "fp32",  # what ran (bf16 may fall back)
        "compile": compile,
        "steps": steps,
        "warmup": max(warmup, 1),
        "seed": seed,
        "first_loss": first_loss,
        "step_s": seconds / steps,
        "tokens_per_s": tokens_per_s,
        "tflops": per_token * tokens_per_s / 1e12,
        "peak_tflops": peak / 1e12 if known else None,
        "mfu": per_token * tokens_per_s / peak if known else None,
        "peak_mem_gb": accel.peak_memory_gb(),
        "a100_ratio": tokens_per_s / a100,
        "a100_reference_mfu": A100_REFERENCE_MFU,
        "torch": torch.__version__,
    }
