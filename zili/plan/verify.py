"""Measure a layout's per-rank memory by building the real model for one rank of a fake world.

`measure_rank_bytes(args, dims, ...)` runs on ONE process that pretends to be rank `rank` of
`dims.world_size` ranks: torch's fake process-group backend (collectives do nothing) and FakeTensorMode
(tensors have shapes and dtypes but no storage). It builds the model with zili's own parallel code
(mesh, pipeline split, TP/SP, activation checkpointing, FSDP2 with bf16 compute and fp32 master weights),
runs one forward+backward of one micro-batch (batch 1) and one AdamW step, and sums the local tensors.

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
from torch.distributed.tensor.debug import _clear_sharding_prop_cache

from zili.config import Config, OptimizerConfig
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.parallel.mesh import ParallelDims, build_mesh, check_layout


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def _config(dims: ParallelDims, stages_per_rank: int, sequence_parallel: bool, checkpointing: bool) -> Config:
    cfg = Config()
    p = cfg.parallelism
    p.tp, p.pp, p.dp_shard, p.dp_replicate = dims.tp, dims.pp, dims.dp_shard, dims.dp_replicate
    p.sequence_parallel = sequence_parallel
    p.pp_stages_per_rank = stages_per_rank
    p.pp_schedule = "Interleaved1F1B" if stages_per_rank > 1 else "1F1B"
    p.pp_microbatches = dims.pp * stages_per_rank
    cfg.training.activation_checkpointing = checkpointing
    cfg.training.micro_batch_size = 0
    cfg.training.batch_size = dims.dp * p.pp_microbatches  # any batch the layout can split: not measured
    return cfg


def measure_rank_bytes(args: ModelArgs, dims: ParallelDims, *, stages_per_rank: int = 1,
                       sequence_parallel: bool = True, activation_checkpointing: bool = False,
                       rank: int = 0, seq_len: int = 16) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state of `rank` in layout `dims`; see the module doc."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from zili.models.transformer import Transformer
    from zili.parallel.apply import transform
    from zili.parallel.pipeline import stage_ids, stage_module
    from zili.train.optim import build_optimizer

    args.validate()
    if stages_per_rank < 1 or (dims.pp == 1 and stages_per_rank != 1):
        raise UserError(f"stages_per_rank={stages_per_rank} is not possible with pp={dims.pp} — use 1, or more "
                        f"only with pp > 1")
    cfg = _config(dims, stages_per_rank, sequence_parallel, activation_checkpointing)
    check_layout(dims, cfg, args)
    if not 0 <= rank < dims.world_size:
        raise UserError(f"rank {rank} is outside the world of {dims.world_size} ranks — use 0..{dims.world_size - 1}")
    if seq_len > args.max_seq_len or (sequence_parallel and dims.tp > 1 and seq_len % dims.tp):
        raise UserError(f"seq_len {seq_len} must be at most max_seq_len ({args.max_seq_len}) and a multiple of "
                        f"tp ({dims.tp}) with sequence parallelism — pick another seq_len")
    if dist.is_initialized():
        raise UserError("a default process group already exists — call measure_rank_bytes in a process without one")

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        mesh = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = Transformer(args)
        n_stages = dims.pp * stages_per_rank
        ids = stage_ids(mesh.get_local_rank("pp"), dims.pp, stages_per_rank) if dims.pp > 1 else [0]
        parts = [stage_module(model, stage, n_stages) if dims.pp > 1 else model for stage in ids]
        for part in parts:  # on the meta device, as zili.parallel.apply.parallelize does
            transform(part, cfg, dims, mesh, compute_dtype=torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True):
            for part in parts:  # storage-less "cpu" tensors; the values (init_weights) don't matter here
                part.to_empty(device="cpu")
            # with sequence parallelism a stage receives its tp-th of the sequence from the previous one
            hidden_len = seq_len // dims.tp if sequence_parallel else seq_len
            for stage, part in zip(ids, parts):
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
            "world_size": dims.world_size,
            "n_params_local": sum(_local(p).numel() for p in params),
        }
    finally:
        dist.destroy_process_group()
        # DTensor caches sharding decisions keyed by mesh shape: drop them, or a later world of the same
        # shape would get this world's (now destroyed) process groups
        _clear_sharding_prop_cache()
