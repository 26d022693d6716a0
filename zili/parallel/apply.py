"""Apply parallelism and training transforms to a model from outside, in torchtitan's order: pipeline split,
context parallelism, tensor (+ sequence) parallelism, expert parallelism, activation checkpointing,
torch.compile, FSDP2 — then materialise the weights.

Contract: `parallelize(model, cfg, layout, mesh, device, seed)` takes a Transformer built on the meta device
and returns a `ParallelModel`: this rank's model part(s) with real weights, and the pipeline schedule when
pp > 1. Every parameter keeps its fully-qualified name (`blocks.3.attn.q_proj.weight` in any layout), so
checkpoints written under one layout load under any other, and Hugging Face adapters see the same keys.
The initial weights are the same in every layout, and each rank computes (or reads) only its own shard of
them: see `zili.parallel.init`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from zili.compat import checkpoint_wrapper, sub_mesh
from zili.config import Config
from zili.parallel.compile import compile_model
from zili.parallel.context_parallel import apply_context_parallel, load_balanced_spans, split_sequence
from zili.parallel.expert_parallel import apply_expert_parallel
from zili.parallel.fsdp import apply_fsdp
from zili.parallel.init import init_weights
from zili.parallel.layout import Layout
from zili.parallel.mesh import build_expert_mesh, pipeline_microbatches
from zili.parallel.pipeline import build_schedule, stage_ids, stage_module
from zili.parallel.tensor_parallel import apply_tensor_parallel


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations during backward instead of storing them (saves memory, costs
    one extra forward per block). The wrapper strips its prefix from state-dict keys."""
    for name, block in list(model.blocks.items()):
        model.blocks[name] = checkpoint_wrapper(block)


@dataclass
class ParallelModel:
    """This rank's share of the model. `parts` has one module, or one per pipeline stage on this rank."""

    parts: list[nn.Module]
    layout: Layout = field(default_factory=Layout)
    mesh: object = None
    schedule: object = None
    has_first_stage: bool = True
    has_last_stage: bool = True

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.layout.pp > 1 else None

    @property
    def data_group(self):
        """The ranks of this rank's model part that see different tokens (dp_replicate x dp_shard x cp), or None
        on one process."""
        return sub_mesh(self.mesh, "data").get_group() if self.mesh is not None else None

    def sequence_part(self, inputs: torch.Tensor, targets: torch.Tensor):
        """(inputs, targets, positions): this rank's columns of the (B, T) batch and the spans of positions they
        hold — under context parallelism its load-balanced chunks (zili.parallel.context_parallel), to be passed
        to the model as `positions`; otherwise the whole batch and None."""
        if self.layout.cp == 1:
            return inputs, targets, None
        spans = load_balanced_spans(inputs.shape[1], self.layout.cp, self.mesh.get_local_rank("cp"))
        return split_sequence(inputs, spans), split_sequence(targets, spans), spans

    def loss_context(self):
        """Cross-entropy over vocabulary-sharded logits when tensor parallel (wrap forward and backward)."""
        return loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext()

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def materialize(model, device: torch.device, offload: bool) -> None:
    """Allocate `model`'s meta tensors (values undefined): on `device`, or with FSDP CPU offload the parameters
    in host memory — but buffers (the RoPE table) always on `device`, where the forward reads them."""
    model.to_empty(device=torch.device("cpu") if offload else device)
    if offload:
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.to(device))


def _dp_mesh(layout: Layout, mesh):
    """FSDP's mesh: the dp_shard x cp ranks, replicated over dp_replicate (HSDP)."""
    if layout.dp_replicate > 1:
        return sub_mesh(mesh, "dp_replicate", "dp_shard_cp")
    return sub_mesh(mesh, "dp_shard_cp")


def _expert_dp_mesh(layout: Layout, expert_mesh):
    """FSDP's mesh for expert-parallel weights: the data ranks holding the same experts (None if there are none)."""
    if layout.shard_group // layout.ep * layout.dp_replicate == 1:
        return None
    if layout.dp_replicate > 1:
        return expert_mesh["dp_replicate", "expert_fsdp"]
    return expert_mesh["expert_fsdp"]


def transform(model, cfg: Config, layout: Layout, mesh, compute_dtype: torch.dtype, device_type: str = "cpu",
              expert_mesh=None) -> None:
    """CP, TP, EP, activation checkpointing, compile and FSDP on one model (part), in place, on the meta device;
    `device_type` is where it will train (compile picks its CPU tricks from it); `expert_mesh` (ep > 1) is
    `zili.parallel.mesh.build_expert_mesh`'s."""
    if layout.cp > 1:
        apply_context_parallel(model, mesh["cp"])
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], layout.sequence_parallel)
    if layout.ep > 1:
        apply_expert_parallel(model, expert_mesh["ep"])
    if layout.recompute == "full":
        apply_activation_checkpointing(model)
    if cfg.training.compile:
        compile_model(model, device_type)
    if layout.fsdp:
        apply_fsdp(model, _dp_mesh(layout, mesh), compute_dtype, cfg.parallelism.fsdp_cpu_offload,
                   reshard_after_forward=layout.pp == 1,
                   expert_dp_mesh=_expert_dp_mesh(layout, expert_mesh) if layout.ep > 1 else None)


def parallelize(model, cfg: Config, layout: Layout | None = None, mesh=None,
                device=torch.device("cpu"),  # noqa: B008 (an immutable constant, safe as a default)
                seed: int = 0, compute_dtype: torch.dtype = torch.float32, initial_value=None,
                loss_fn=None) -> ParallelModel:
    """Split, shard and materialise `model` (built on the meta device) for this rank; see the module doc.
    `initial_value(name, full_shape, offsets, sizes)`, if given, supplies the starting weights region by region
    (e.g. from Hugging Face; see `zili.parallel.init`);
    `loss_fn(logits, targets)` is the pipeline schedule's loss (needed when pp > 1)."""
    layout = layout or Layout()
    offload = cfg.parallelism.fsdp_cpu_offload and layout.fsdp
    expert_mesh = build_expert_mesh(layout, mesh.device_type) if layout.ep > 1 else None
    if layout.pp == 1:
        transform(model, cfg, layout, mesh, compute_dtype, device.type, expert_mesh)
        materialize(model, device, offload)
        init_weights(model, seed, initial_value)
        return ParallelModel([model], layout, mesh)

    n_stages = layout.pp * layout.vpp
    ids = stage_ids(mesh.get_local_rank("pp"), layout.pp, layout.vpp)
    parts = []
    for stage in ids:
        part = stage_module(model, stage, n_stages)
        transform(part, cfg, layout, mesh, compute_dtype, device.type, expert_mesh)
        materialize(part, device, offload)
        init_weights(part, seed, initial_value)
        parts.append(part)
    schedule = build_schedule(parts, ids, n_stages, device, mesh["pp"].get_group(), cfg.parallelism.pp_schedule,
                              pipeline_microbatches(cfg.parallelism), loss_fn)
    return ParallelModel(parts, layout, mesh, schedule, has_first_stage=0 in ids, has_last_stage=n_stages - 1 in ids)
