"""Apply training transforms to a model from outside: activation checkpointing and torch.compile, per
decoder block (FSDP2, tensor and pipeline parallelism join here with the distributed issue).

Contract: `parallelize(model, cfg)` changes `model.blocks` in place and keeps every parameter's
fully-qualified name, so checkpoints and Hugging Face adapters see the same keys with or without it.
"""

from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from zili.config import Config
from zili.errors import UserError


def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations during backward instead of storing them (saves memory, costs
    one extra forward per block). The wrapper strips its prefix from state-dict keys."""
    for name, block in list(model.blocks.items()):
        model.blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def parallelize(model, cfg: Config, world_size: int = 1) -> None:
    """Validate the parallel layout for `world_size` processes and apply AC / compile as configured."""
    p = cfg.parallelism
    if p.tp != 1 or p.pp != 1 or p.dp_replicate != 1 or p.dp_shard not in (-1, 1) or world_size != 1:
        raise UserError("parallel layouts other than a single process are not available yet — "
                        "use the default [parallelism] (tp=1, pp=1, dp_replicate=1, dp_shard=-1)")
    if cfg.training.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.training.compile:
        from zili.parallel.compile import compile_model

        compile_model(model)
