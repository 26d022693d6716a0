"""The one place for torch version shims and torch private APIs. Everything else in zili imports public torch
API only; when torch moves or changes a private name, this file is what to fix.

- `local_region(global_shape, mesh, placements)`: where this rank's shard of a DTensor lies in the full
  tensor, through `torch.distributed.tensor._utils.compute_local_shape_and_global_offset` (private; it
  understands `_StridedShard`, the placement FSDP2 gives a parameter already sharded by tensor parallelism).
- `checkpoint_wrapper`, `flatten_mesh`, `sub_mesh`: activation checkpointing per block, one collective over
  several mesh dims.
- `fake_world`, `fake_tensor_mode`, `clear_sharding_cache`: one rank of a large world without its hardware
  (`zili plan --verify`).
- `PipelineSchedule`: a `torch.distributed.pipelining` schedule driven the same way on every torch in the range.
- `fused_step_unless`: a fused optimizer step skipped on the device (GradScaler's `found_inf` protocol).
- `pipeline_stage`: a `PipelineStage` whose first-step handshake has matching sizes on every torch, and whose
  shape inference leaves the stage's buffers as they were.
- `grouped_mm`: one matrix multiply per group of rows (mixture-of-experts), public from torch 2.10.
- `all_gather_autograd`: an all-gather along one dimension that autograd differentiates (its gradient is the
  reduce-scatter), from torch's functional collectives (context parallelism).
- `set_default_collective_timeout`: the timeout of process groups created without one (DeviceMesh's).

Differences between the torch releases in the declared range (2.9 to 2.13) are detected by feature — does the
function take this argument, does the class have this method — not by version number, so a vendor build that
backports a feature gets it. The table of what differs is in docs/accelerators.md.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import warnings
from collections.abc import Sequence

import torch
import torch.distributed
from torch.distributed import _functional_collectives
from torch.distributed import device_mesh as _device_mesh
from torch.distributed import distributed_c10d as _c10d
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as _checkpoint_wrapper
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor import debug as _dtensor_debug
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard


def _takes(fn, argument: str) -> bool:
    """Whether callable `fn` has a parameter named `argument`."""
    try:
        return argument in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _indices_along(dim: int, size: int, mesh, placements: Sequence) -> torch.Tensor:
    """The indices along tensor dimension `dim` (of `size`) that this rank holds: shard a probe arange(size)
    with the placements that act on `dim`, locally (no communication, O(size) work)."""
    probe = []
    for p in placements:
        if isinstance(p, _StridedShard) and p.dim == dim:
            probe.append(_StridedShard(0, split_factor=p.split_factor))
        elif isinstance(p, Shard) and not isinstance(p, _StridedShard) and p.dim == dim:
            probe.append(Shard(0))
        else:
            probe.append(Replicate())
    return distribute_tensor(torch.arange(size), mesh, probe, src_data_rank=None).to_local().cpu()


def local_region(global_shape: Sequence[int], mesh, placements: Sequence) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) per dimension of this rank's shard of a DTensor of `global_shape` laid out by
    `placements` on `mesh`: the shard is full[offsets[d] : offsets[d] + sizes[d]] in every dimension d.
    RuntimeError if the shard is not such a hyper-rectangle (a strided sharding that interleaves rows)."""
    sizes, offsets = compute_local_shape_and_global_offset(tuple(global_shape), mesh, tuple(placements))
    sizes, offsets = tuple(int(s) for s in sizes), tuple(int(o) for o in offsets)
    for p in placements:
        if not isinstance(p, _StridedShard):
            continue  # nested plain Shards cut contiguous pieces of contiguous pieces
        dim = p.dim % len(global_shape)
        held = _indices_along(dim, global_shape[dim], mesh, placements)
        if not torch.equal(held, torch.arange(offsets[dim], offsets[dim] + sizes[dim])):
            raise RuntimeError(f"placements {tuple(placements)} give this rank non-contiguous indices along dim "
                               f"{dim} of a tensor of shape {tuple(global_shape)} — not a region")
    return offsets, sizes


def checkpoint_wrapper(module: torch.nn.Module) -> torch.nn.Module:
    """`module` recomputing its activations in backward (torch's private `checkpoint_wrapper`, as torchtitan
    uses it: non-reentrant, names gain `_checkpoint_wrapped_module.`, which state dicts strip)."""
    return _checkpoint_wrapper(module, preserve_rng_state=False)


def flatten_mesh(mesh, dims: tuple[str, ...], name: str) -> None:
    """Register the flattened sub-mesh `mesh[dims]` as `name` (DeviceMesh's private `_flatten`, the documented
    way to reduce over several mesh dimensions in one collective)."""
    mesh[dims]._flatten(name)


def sub_mesh(mesh, *names: str):
    """`mesh[names]`, where names may include dimensions registered by `flatten_mesh`. torch 2.11+ warns that
    slicing a flattened dimension from the root mesh "will be deprecated" (it still works in 2.13, and no
    public replacement spans 2.9 to 2.13), so the warning is silenced here, the one place to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh[names if len(names) > 1 else names[0]]


def fake_world(rank: int, world_size: int) -> None:
    """Join a process group of `world_size` ranks whose collectives do nothing (torch's testing `fake`
    backend), as rank `rank`: for measuring one rank of a large layout on one machine."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # testing module: import only when used

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def fake_tensor_mode():
    """Tensors without storage (FakeTensorMode), real tensors allowed as inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def clear_sharding_cache() -> None:
    """Drop DTensor's cached sharding decisions and flattened meshes (keyed by mesh shape): after a world is
    destroyed, a later world of the same shape would otherwise get its dead process groups. (torch >= 2.11 has
    a function for the first; before, the cache is the `lru_cache` on the sharding propagator's method.)"""
    # torch <= 2.10 also keeps flattened sub-meshes per root mesh, which compares by shape: drop them too
    for name in ("root_to_flatten_mapping", "flatten_name_to_root_dims"):
        mapping = getattr(_device_mesh._mesh_resources, name, None)
        if isinstance(mapping, dict):
            mapping.clear()
    if hasattr(_dtensor_debug, "_clear_sharding_prop_cache"):
        _dtensor_debug._clear_sharding_prop_cache()
        return
    cached = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding
    # torch <= 2.10: an lru_cache, or (2.6) a thread-local holder of one
    (cached.cache_clear if hasattr(cached, "cache_clear") else cached.cache.cache_clear)()


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, K) rows `a`, cut into groups by the cumulative row counts `offs` (int32, one per group), each times
    its own (K, N) matrix of `b` (G, K, N): (M, N). `torch.nn.functional.grouped_mm` where torch has it, else
    the private `torch._grouped_mm` behind it (torch 2.9)."""
    public = getattr(torch.nn.functional, "grouped_mm", None)
    if public is not None:
        return public(a, b, offs=offs)
    return torch._grouped_mm(a, b, offs=offs)


def all_gather_autograd(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The `tensor`s of every rank of `group` concatenated along `dim`, in group-rank order; autograd sends each
    rank the sum over ranks of the gradient of its own part (a reduce-scatter). torch's functional collective
    (`torch.distributed._functional_collectives.all_gather_tensor_autograd`, in every torch of the range; the
    public `torch.distributed.nn.functional.all_gather` is deprecated from 2.13), which torch.compile traces and
    which runs on gloo as on nccl."""
    return _functional_collectives.all_gather_tensor_autograd(tensor, gather_dim=dim, group=group)


def set_default_collective_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created from now on without one. `init_process_group`
    takes a timeout, but `new_group`/`split_group` (which DeviceMesh calls for each mesh dimension) fall back to
    torch's module defaults (30 min; 10 min for NCCL), read from these two module globals on every torch in the
    range."""
    _c10d.default_pg_timeout = timeout
    _c10d.default_pg_nccl_timeout = timeout


def fused_step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Step a fused optimizer (`fused=True` Adam/AdamW/SGD) unless `skip` (0-dim 0/1 device tensor) is 1, with
    no host sync: through the `found_inf` attribute that `torch.amp.GradScaler` sets for fused optimizers, on
    which the fused kernel leaves parameters, moments and step count as they were."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module):
    """Restore `module`'s buffers on exit to their values on entry — only those that changed: an unchanged one may
    be saved for a backward still to run, which an in-place write would invalidate."""
    saved = [(b, b.clone()) for b in module.buffers() if not b.is_meta]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


class _Stage(PipelineStage):
    """Two fixes to `PipelineStage`, each a no-op on a torch without the method it overrides:
    - torch 2.9 and 2.10 start a pipeline by sending each neighbour an int64 where it receives a float32: gloo
      refuses the size mismatch ("Received data size doesn't match expected size") and NCCL's behaviour is
      undefined. This stage sends float32, as torch 2.11 does.
    - The first step infers the shapes between stages by running each stage's forward on placeholder tensors
      (`_shape_inference` up to torch 2.12, `_forward_metadata_inference` from 2.13): that forward must not
      change the module's state — a mixture-of-experts layer would count the placeholders' tokens into the
      load it balances on — so the buffers are restored after it."""

    def _get_init_p2p_neighbors_ops(self):
        ops = super()._get_init_p2p_neighbors_ops()
        for op in ops:
            if op.tensor.dtype != torch.float32:
                op.tensor = op.tensor.float()
        return ops

    def _shape_inference(self, *args, **kwargs):
        with _buffers_kept(self.submod):
            return super()._shape_inference(*args, **kwargs)

    def _forward_metadata_inference(self, *args, **kwargs):
        with _buffers_kept(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)


def pipeline_stage(module: torch.nn.Module, index: int, n_stages: int, device: torch.device, group) -> PipelineStage:
    """`PipelineStage(module, index, n_stages, device, group=group)` with the fixes of `_Stage`."""
    return _Stage(module, index, n_stages, device, group=group)


class PipelineSchedule:
    """A `torch.distributed.pipelining` schedule with one behaviour on every torch in zili's range.

    `make_stages()` returns this rank's `PipelineStage`s (fresh objects on each call, over the same modules);
    `schedule_class` is e.g. `Schedule1F1B`; `loss_fn(output, target)` is the mean loss of one micro-batch.
    `step` runs forward and backward and leaves in the parameters' `.grad` the gradient of the MEAN of the
    micro-batch losses; `eval` runs forward only. Both put the per-micro-batch losses into `losses` on the rank
    holding the last stage.

    - torch >= 2.10: the last stage's outputs are dropped (`return_outputs=False`); torch 2.9 keeps them until
      the step ends.
    - Evaluation runs on stages of its own, built at the first `eval`: up to torch 2.12 a stage first run
      forward-only keeps receive buffers without gradients, and its next training step fails ("has gradients
      None").
    """

    def __init__(self, schedule_class, make_stages, microbatches: int, loss_fn):
        self._class, self._make_stages, self._n, self._loss_fn = schedule_class, make_stages, microbatches, loss_fn
        self._train = self._build()
        self._eval = None

    def _build(self):
        stages = self._make_stages()
        first = stages[0] if issubclass(self._class, PipelineScheduleSingle) else stages
        return self._class(first, n_microbatches=self._n, loss_fn=self._loss_fn, scale_grads=True)

    @staticmethod
    def _run(method, args, target, losses) -> None:
        if _takes(method, "return_outputs"):
            method(*args, target=target, losses=losses, return_outputs=False)
        else:
            method(*args, target=target, losses=losses)

    def step(self, *args, target=None, losses: list | None = None) -> None:
        """Forward and backward of one local batch (`args` only on the rank holding the first stage)."""
        self._run(self._train.step, args, target, losses)

    def eval(self, *args, target=None, losses: list | None = None) -> None:
        """Forward only; `losses` as in `step`."""
        if self._eval is None:
            self._eval = self._build()
        self._run(self._eval.eval, args, target, losses)
