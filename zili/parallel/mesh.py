"""The parallel layout: `[parallelism]` degrees -> validated `ParallelDims` -> one DeviceMesh.

Mesh dimensions, outermost first: `pp`, `dp_replicate`, `dp_shard`, `tp` (tensor parallelism innermost,
so its groups are neighbouring ranks, i.e. the same node). Their product is the world size. Data
parallelism is `dp = dp_replicate * dp_shard`: ranks with the same dp coordinate see the same data.

Every check here raises `UserError` with one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

from zili.config import Config, ParallelismConfig
from zili.errors import UserError
from zili.models.args import ModelArgs

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees (no -1) of one layout."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of the global batch are trained at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        return self.dp > 1

    def describe(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)


def resolve_dims(par: ParallelismConfig, world_size: int) -> ParallelDims:
    """The degrees for `world_size` ranks; dp_shard=-1 takes whatever the other degrees leave."""
    fixed = par.dp_replicate * par.tp * par.pp
    dp_shard = par.dp_shard
    needed = fixed * max(dp_shard, 1)
    if world_size == 1 and needed > 1:
        raise UserError(f"the [parallelism] layout needs {needed} processes but this is a single process — launch "
                        f"with `torchrun --nproc-per-node={needed} -m zili train ...`, or use the default layout")
    if dp_shard == -1:
        if world_size % fixed:
            raise UserError(f"dp_replicate*tp*pp = {par.dp_replicate}*{par.tp}*{par.pp} = {fixed} does not divide the "
                            f"world size {world_size} — choose degrees whose product divides the number of processes")
        dp_shard = world_size // fixed
    dims = ParallelDims(pp=par.pp, dp_replicate=par.dp_replicate, dp_shard=dp_shard, tp=par.tp)
    if dims.world_size != world_size:
        raise UserError(f"the layout {dims.describe()} needs {dims.world_size} processes but {world_size} were "
                        f"started — make the product of the degrees equal the world size (or set dp_shard=-1)")
    return dims


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


def check_layout(dims: ParallelDims, cfg: Config, args: ModelArgs) -> None:
    """Check that the model and the batch can be cut this way."""
    par, t = cfg.parallelism, cfg.training
    if dims.tp > 1:
        for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("ffn_dim", args.ffn_dim),
                            ("vocab_size", args.vocab_size)):
            if value % dims.tp:
                raise UserError(f"parallelism.tp={dims.tp} does not divide the model's {what} ({value}) — "
                                f"choose a tp that divides {what}")
    if dims.pp > 1:
        per_rank = stages_per_rank(par)
        if par.pp_schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
            raise UserError(f"parallelism.pp_schedule={par.pp_schedule} runs one stage per rank, not {per_rank} — "
                            "set pp_stages_per_rank=1 or pick an interleaved schedule")
        stages = dims.pp * per_rank
        if stages > args.n_layers:
            raise UserError(f"pp={dims.pp} with {per_rank} stage(s) per rank makes {stages} pipeline stages but the "
                            f"model has {args.n_layers} layers — use at most {args.n_layers} stages")
        if args.tied_embeddings:
            raise UserError("pipeline parallelism needs an output head of its own (the embedding lives on the first "
                            "stage) — set model.tied_embeddings=false or pp=1")
    if t.batch_size % dims.dp:
        raise UserError(f"training.batch_size {t.batch_size} is not divisible by the data-parallel degree {dims.dp} "
                        f"(dp_replicate*dp_shard) — use a multiple of {dims.dp}")
    local = t.batch_size // dims.dp
    if dims.pp > 1:
        micro = pipeline_microbatches(par)
        if local % micro:
            raise UserError(f"the local batch of {local} sequences does not split into pp_microbatches={micro} — "
                            f"make training.batch_size / dp a multiple of it")
        if micro < dims.pp:
            raise UserError(f"parallelism.pp_microbatches={micro} is fewer than the {dims.pp} pipeline ranks — "
                            f"use at least {dims.pp}")
        if t.micro_batch_size:
            raise UserError("training.micro_batch_size does not apply with pp > 1 (the pipeline splits the batch into "
                            "parallelism.pp_microbatches) — leave it at 0")
    elif t.micro_batch_size and local % t.micro_batch_size:
        raise UserError(f"the local batch of {local} sequences (batch_size / dp) is not a multiple of "
                        f"training.micro_batch_size={t.micro_batch_size} — choose one that divides it")


def build_mesh(dims: ParallelDims, device_type: str):
    """The DeviceMesh over all ranks with dimensions `MESH_DIMS` (needs an initialised process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(dims, name) for name in MESH_DIMS)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    if dims.fsdp and dims.tp > 1:
        # a norm over parameters sharded on (dp_shard, tp) then reduces in one collective, not two
        mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    return mesh


def dp_rank(mesh) -> int:
    """This rank's data-parallel index in [0, dp)."""
    return mesh.get_local_rank("dp_replicate") * mesh["dp_shard"].size() + mesh.get_local_rank("dp_shard")
