"""The trainer's layout: `[parallelism]` and `[training]` -> a checked `Layout` -> one DeviceMesh.

Mesh dimensions, outermost first: `pp`, `dp_replicate`, `dp_shard`, `cp`, `tp` (tensor parallelism innermost,
so its groups are neighbouring ranks, i.e. the same node). Their product is the world size. Data
parallelism is `dp = dp_replicate * dp_shard`: ranks with the same dp coordinate see the same data (the cp
ranks of one dp coordinate split each of its sequences). FSDP shards over `dp_shard_cp` (dp_shard x cp
flattened). The experts of MoE layers use a mesh of their own (`expert_mesh`).

`resolve_layout` turns the config into the shared `zili.parallel.layout.Layout` (what the planner plans) and
checks what only the config can get wrong; `check_layout` applies the shared rules and what the trainer does
not run yet. Every check raises `UserError` with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh

from zili.compat import flatten_mesh
from zili.config import Config, ParallelismConfig
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.parallel.layout import Layout, problem, trainer_problem

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_MESH_DIMS = ("pp", "dp_replicate", "expert_fsdp", "ep", "tp")
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")


def stages_per_rank(par: ParallelismConfig) -> int:
    """Pipeline stages on each pp rank (virtual stages for interleaved schedules)."""
    if par.pp == 1:
        return 1
    if par.pp_stages_per_rank:
        return par.pp_stages_per_rank
    return 1 if par.pp_schedule in SINGLE_STAGE_SCHEDULES else 2


def pipeline_microbatches(par: ParallelismConfig) -> int:
    """Micro-batches per pipeline step: pp_microbatches, or by default one per pipeline stage."""
    return par.pp_microbatches or par.pp * stages_per_rank(par)


def _degrees(par: ParallelismConfig, world_size: int) -> tuple[int, int, int, int]:
    """(pp, dp_replicate, dp_shard, tp) for `world_size` ranks; dp_shard=-1 takes what the others leave."""
    fixed = par.dp_replicate * par.tp * par.pp * par.cp
    needed = fixed * max(par.dp_shard, 1)
    if world_size == 1 and needed > 1:
        raise UserError(f"the [parallelism] layout needs {needed} processes but this is a single process — launch "
                        f"with `torchrun --nproc-per-node={needed} -m zili train ...`, or use the default layout")
    dp_shard = par.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise UserError(f"dp_replicate*tp*pp*cp = {par.dp_replicate}*{par.tp}*{par.pp}*{par.cp} = {fixed} does not "
                            f"divide the world size {world_size} — choose degrees whose product divides the number of "
                            "processes")
        dp_shard = world_size // fixed
    if fixed * dp_shard != world_size:
        raise UserError(f"the layout pp={par.pp} x dp_replicate={par.dp_replicate} x dp_shard={dp_shard} x cp={par.cp} "
                        f"x tp={par.tp} needs {fixed * dp_shard} processes but {world_size} were started — make the "
                        "product of the degrees equal the world size (or set dp_shard=-1)")
    return par.pp, par.dp_replicate, dp_shard, par.tp


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """The layout `cfg` asks for on `world_size` ranks; UserError where the config itself does not add up."""
    par, t = cfg.parallelism, cfg.training
    pp, dp_replicate, dp_shard, tp = _degrees(par, world_size)
    dp = dp_replicate * dp_shard
    per_rank = stages_per_rank(par)
    if pp > 1 and par.pp_schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
        raise UserError(f"parallelism.pp_schedule={par.pp_schedule} runs one stage per rank, not {per_rank} — "
                        "set pp_stages_per_rank=1 or pick an interleaved schedule")
    if t.batch_size % dp:
        raise UserError(f"training.batch_size {t.batch_size} is not divisible by the data-parallel degree {dp} "
                        f"(dp_replicate*dp_shard) — use a multiple of {dp}")
    local = t.batch_size // dp
    if pp > 1:
        micro = pipeline_microbatches(par)
        if t.micro_batch_size:
            raise UserError("training.micro_batch_size does not apply with pp > 1 (the pipeline splits the batch into "
                            "parallelism.pp_microbatches) — leave it at 0")
        if local % micro:
            raise UserError(f"the local batch of {local} sequences does not split into pp_microbatches={micro} — "
                            f"make training.batch_size / dp a multiple of it")
        microbatch = local // micro
    else:
        if t.micro_batch_size and local % t.micro_batch_size:
            raise UserError(f"the local batch of {local} sequences (batch_size / dp) is not a multiple of "
                            f"training.micro_batch_size={t.micro_batch_size} — choose one that divides it")
        microbatch = t.micro_batch_size or local
    return Layout(tp=tp, pp=pp, vpp=per_rank, cp=par.cp, ep=par.ep, dp_shard=dp_shard, dp_replicate=dp_replicate,
                  microbatch=microbatch,
                  recompute="full" if t.activation_checkpointing else "none",
                  sequence_parallel=par.sequence_parallel and tp > 1, dtype=t.dtype)


def check_layout(layout: Layout, args: ModelArgs, global_batch: int, seq_len: int | None = None) -> None:
    """The shared layout rules (at `seq_len` tokens per sequence, when given), then what the trainer does not run
    yet: UserError with the first problem."""
    why = problem(layout, args, seq_len=seq_len, global_batch=global_batch) or trainer_problem(layout, args)
    if why:
        raise UserError(why)


def build_mesh(layout: Layout, device_type: str):
    """The DeviceMesh over all ranks with dimensions `MESH_DIMS` (needs an initialised process group)."""
    shape = tuple(getattr(layout, name) for name in MESH_DIMS)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    flatten_mesh(mesh, ("dp_shard", "cp"), "dp_shard_cp")
    flatten_mesh(mesh, ("dp_replicate", "dp_shard", "cp"), "data")  # the ranks whose tokens differ
    if layout.fsdp and layout.tp > 1:
        # a norm over parameters sharded on (dp_shard, cp, tp) then reduces in one collective, not two
        flatten_mesh(mesh, ("dp_shard", "cp", "tp"), "dp_shard_cp_tp")
    return mesh


def build_expert_mesh(layout: Layout, device_type: str):
    """The experts' DeviceMesh (ep > 1): the same ranks in the same order as `build_mesh`'s, with the dp_shard x
    cp ranks regrouped as `expert_fsdp` x `ep` — ep innermost, so an expert group is neighbouring data ranks
    (the cp ranks first) — dimensions ("pp", "dp_replicate", "expert_fsdp", "ep", "tp")."""
    shape = (layout.pp, layout.dp_replicate, layout.shard_group // layout.ep, layout.ep, layout.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_DIMS)


def dp_rank(mesh) -> int:
    """This rank's data-parallel index in [0, dp)."""
    return mesh.get_local_rank("dp_replicate") * mesh["dp_shard"].size() + mesh.get_local_rank("dp_shard")
