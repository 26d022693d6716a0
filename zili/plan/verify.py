"""Measure a layout's per-rank memory by building the real model for one rank of a fake world.

`measure_rank_bytes(args, layout, ...)` runs on ONE process that pretends to be rank `rank` of
`layout.world_size` ranks: torch's fake process-group backend (collectives do nothing) and FakeTensorMode
(tensors have shapes and dtypes but no storage). It builds the model with zili's own parallel code
(mesh, pipeline split into `layout.vpp` stages per pp rank, TP/SP, activation checkpointing for
`recompute = "full"`, FSDP2 with bf16 compute and fp32 master weights), runs one forward+backward of one
micro-batch (batch 1) and one AdamW step, and sums the local tensors. Mixture-of-experts models (expert
parallelism included) skip the forward+backward — how many rows each expert gets depends on the token values,
which fake tensors do not have — and get one gradient per parameter shard, the shape FSDP2 leaves. The layout
must pass the shared rules and the trainer's (zili.parallel.layout.problem, trainer_problem); the layout's
micro-batch, dtype and attention kernel are not used.

Returned counts are in bytes (`params`, `grads`, `optimizer`: this rank's persistent tensors, i.e. the
local shards of DTensors) plus `stage_ids` (pipeline stages held), `world_size` and `n_params_local`
(elements). Gradients are whatever autograd and FSDP leave in `p.grad`: with tensor parallelism and no
FSDP (dp = 1), torch 2.13 returns the embedding's gradient replicated, i.e. full size on every tp rank.
Activations and communication buffers are not counted.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from zili.compat import clear_sharding_cache, fake_tensor_mode, fake_world
from zili.config import Config, OptimizerConfig
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.apply import transform
from zili.parallel.layout import Layout, problem, trainer_problem
from zili.parallel.mesh import build_expert_mesh, build_mesh
from zili.parallel.pipeline import stage_ids, stage_module
from zili.train.optim import build_optimizer


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def _config(layout: Layout) -> Config:
    """A trainer config that says what `layout` says (for the parts of zili's parallel code that read it)."""
    cfg = Config()
    p = cfg.parallelism
    p.tp, p.pp, p.dp_shard, p.dp_replicate = layout.tp, layout.pp, layout.dp_shard, layout.dp_replicate
    p.cp, p.ep = layout.cp, layout.ep
    p.sequence_parallel = layout.sequence_parallel
    p.pp_stages_per_rank = layout.vpp
    p.pp_schedule = "Interleaved1F1B" if layout.vpp > 1 else "1F1B"
    p.pp_microbatches = layout.pp * layout.vpp
    cfg.training.activation_checkpointing = layout.recompute == "full"
    cfg.training.micro_batch_size = 0
    cfg.training.batch_size = layout.dp * p.pp_microbatches  # any batch the layout can split: not measured
    return cfg


def measure_rank_bytes(args: ModelArgs, layout: Layout, *, rank: int = 0, seq_len: int = 16) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state of `rank` in `layout`, after one step on
    sequences of `seq_len` tokens; see the module doc."""
    args.validate()
    cfg = _config(layout)
    why = problem(layout, args, global_batch=cfg.training.batch_size) or trainer_problem(layout, args)
    if why:
        raise UserError(why)
    if not 0 <= rank < layout.world_size:
        raise UserError(f"rank {rank} is outside the world of {layout.world_size} ranks — use "
                        f"0..{layout.world_size - 1}")
    sequence_parallel = layout.sequence_parallel
    if seq_len > args.max_seq_len or (sequence_parallel and seq_len % layout.tp):
        raise UserError(f"seq_len {seq_len} must be at most max_seq_len ({args.max_seq_len}) and a multiple of "
                        f"tp ({layout.tp}) with sequence parallelism — pick another seq_len")
    if dist.is_initialized():
        raise UserError("a default process group already exists — call measure_rank_bytes in a process without one")

    fake_world(rank, layout.world_size)
    try:
        mesh = build_mesh(layout, "cpu")
        expert_mesh = build_expert_mesh(layout, "cpu") if layout.ep > 1 else None
        with torch.device("meta"):
            model = Transformer(args)
        n_stages = layout.pp * layout.vpp
        ids = stage_ids(mesh.get_local_rank("pp"), layout.pp, layout.vpp) if layout.pp > 1 else [0]
        parts = [stage_module(model, stage, n_stages) if layout.pp > 1 else model for stage in ids]
        for part in parts:  # on the meta device, as zili.parallel.apply.parallelize does
            transform(part, cfg, layout, mesh, compute_dtype=torch.bfloat16, expert_mesh=expert_mesh)
        with fake_tensor_mode():
            for part in parts:  # storage-less "cpu" tensors; the values (init_weights) don't matter here
                part.to_empty(device="cpu")
            # with sequence parallelism a stage receives its tp-th of the sequence from the previous one
            hidden_len = seq_len // layout.tp if sequence_parallel else seq_len
            for stage, part in zip(ids, parts):
                if args.is_moe:  # routing sizes depend on token values, which fake tensors lack: FSDP's grads
                    for p in part.parameters():
                        p.grad = torch.zeros_like(p)
                    continue
                if stage == 0:
                    x = torch.zeros(1, seq_len, dtype=torch.long)
                else:
                    x = torch.zeros(1, hidden_len, args.dim, dtype=torch.bfloat16, requires_grad=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = part(x)
                if isinstance(out, DTensor):
                    out = out.to_local()
                out.float().mean().backward()
            opts = [build_optimizer(part, OptimizerConfig(), "cpu") for part in parts]
            for opt in opts:
                opt.step()
        params = [p for part in parts for p in part.parameters()]
        return {
            "params": _nbytes(params),
            "grads": _nbytes(p.grad for p in params),
            "optimizer": sum(_nbytes(opt.state[p].values()) for opt in opts for p in opt.state),
            "stage_ids": list(ids),
            "world_size": layout.world_size,
            "n_params_local": sum(_local(p).numel() for p in params),
        }
    finally:
        dist.destroy_process_group()
        clear_sharding_cache()  # or a later world of the same shape would get this one's dead groups
