"""Apply parallelism and training transforms to a model from outside, in torchtitan's order: pipeline split,
tensor (+ sequence) parallelism, activation checkpointing, torch.compile, FSDP2 — then materialise the
weights.

Contract: `parallelize(model, cfg, dims, mesh, device, seed)` takes a Transformer built on the meta device
and returns a `ParallelModel`: this rank's model part(s) with real weights, and the pipeline schedule when
pp > 1. Every parameter keeps its fully-qualified name (`blocks.3.attn.q_proj.weight` in any layout), so
checkpoints written under one layout load under any other, and Hugging Face adapters see the same keys.
The initial weights are the same in every layout: each parameter's full initial value is computed from
(seed, name) and this rank keeps its shard of it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor, distribute_tensor

from zili.config import Config
from zili.models.transformer import canonical_name, rope_table
from zili.parallel.mesh import ParallelDims, pipeline_microbatches, stages_per_rank


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations during backward instead of storing them (saves memory, costs
    one extra forward per block). The wrapper strips its prefix from state-dict keys."""
    for name, block in list(model.blocks.items()):
        model.blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)


@torch.no_grad()
def init_weights(model, seed: int, initial_value=None) -> None:
    """Give every parameter of `model` (plain or DTensor-sharded) this rank's part of its initial value:
    `initial_value(name, shape)` (full tensor) if given, else the model's own random init from `seed`."""
    model.rope.copy_(rope_table(model.args, device=model.rope.device))
    for name, p in model.named_parameters():
        if initial_value is not None:
            full = initial_value(canonical_name(name), p.shape)
        else:
            full = model.initial_value(canonical_name(name), p.shape, seed)
        if isinstance(p, DTensor):
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)


@dataclass
class ParallelModel:
    """This rank's share of the model. `parts` has one module, or one per pipeline stage on this rank."""

    parts: list[nn.Module]
    dims: ParallelDims = field(default_factory=ParallelDims)
    mesh: object = None
    schedule: object = None
    has_first_stage: bool = True
    has_last_stage: bool = True

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.dims.pp > 1 else None

    def loss_context(self):
        """Cross-entropy over vocabulary-sharded logits when tensor parallel (wrap forward and backward)."""
        if self.dims.tp > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def _dp_mesh(dims: ParallelDims, mesh):
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def transform(model, cfg: Config, dims: ParallelDims, mesh, compute_dtype: torch.dtype) -> None:
    """TP, activation checkpointing, compile and FSDP on one model (part), in place, on the meta device."""
    t, par = cfg.training, cfg.parallelism
    if dims.tp > 1:
        from zili.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], par.sequence_parallel)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        from zili.parallel.compile import compile_model

        compile_model(model)
    if dims.fsdp:
        from zili.parallel.fsdp import apply_fsdp

        apply_fsdp(model, _dp_mesh(dims, mesh), compute_dtype, par.fsdp_cpu_offload, reshard_after_forward=dims.pp == 1)


def parallelize(model, cfg: Config, dims: ParallelDims | None = None, mesh=None, device=torch.device("cpu"),
                seed: int = 0, compute_dtype: torch.dtype = torch.float32, initial_value=None) -> ParallelModel:
    """Split, shard and materialise `model` (built on the meta device) for this rank; see the module doc.
    `initial_value(name, shape)`, if given, supplies the starting weights (e.g. from Hugging Face)."""
    dims = dims or ParallelDims()
    par = cfg.parallelism
    init_device = torch.device("cpu") if par.fsdp_cpu_offload and dims.fsdp else device
    if dims.pp == 1:
        transform(model, cfg, dims, mesh, compute_dtype)
        model.to_empty(device=init_device)
        init_weights(model, seed, initial_value)
        return ParallelModel([model], dims, mesh)

    from zili.parallel.pipeline import build_schedule, stage_ids, stage_module
    from zili.train.step import lm_loss

    per_rank = stages_per_rank(par)
    n_stages = dims.pp * per_rank
    ids = stage_ids(mesh.get_local_rank("pp"), dims.pp, per_rank)
    parts = []
    for stage in ids:
        part = stage_module(model, stage, n_stages)
        transform(part, cfg, dims, mesh, compute_dtype)
        part.to_empty(device=init_device)
        init_weights(part, seed, initial_value)
        parts.append(part)
    schedule = build_schedule(parts, ids, n_stages, device, mesh["pp"].get_group(), par.pp_schedule,
                              pipeline_microbatches(par), lm_loss)
    return ParallelModel(parts, dims, mesh, schedule, has_first_stage=0 in ids, has_last_stage=n_stages - 1 in ids)
