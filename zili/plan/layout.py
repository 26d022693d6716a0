"""A parallel layout for the planner and the rules that make it possible or not.

Ranks are laid out like zili's DeviceMesh, outermost first: pp, dp_replicate, dp_shard, cp, tp — tensor
parallelism innermost, so a tp group is neighbouring ranks in one node. Expert parallelism (ep) reuses the
dp_shard x cp ranks (innermost part), as torchtitan does. The data-parallel degree is
dp = dp_replicate * dp_shard; each pipeline runs `microbatches = global_batch / (dp * microbatch)` micro-batches
per optimizer step. `zero` is the ZeRO stage over the dp_shard x cp group (zili's FSDP2 is stage 3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LAYOUT_KEYS = ("tp", "pp", "vpp", "cp", "ep", "dp_shard", "dp_replicate", "zero", "microbatch", "recompute",
               "sequence_parallel", "dtype", "attention")
RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("flash", "materialized")  # fused kernel that never stores the scores (SDPA, FlashAttention) or not
DTYPES = ("bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    zero: int = 3
    microbatch: int = 1  # sequences per micro-batch
    recompute: str = "none"
    sequence_parallel: bool = False
    dtype: str = "bf16"
    attention: str = "flash"  # the attention kernel: "flash" (zili's SDPA) or "materialized" scores

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp_shard * self.dp_replicate

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def shard_group(self) -> int:
        """Ranks that split parameters / optimizer state under ZeRO (dp_shard x cp, as FSDP2 over both)."""
        return self.dp_shard * self.cp

    def microbatches(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.microbatch)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"v{self.vpp}" if self.vpp > 1 else "")]
        parts += [f"{k}{getattr(self, k)}" for k in ("cp", "ep") if getattr(self, k) > 1]
        parts += [f"dps{self.dp_shard}", f"dpr{self.dp_replicate}", f"mb{self.microbatch}", self.recompute]
        return " ".join(parts) + (" sp" if self.sequence_parallel else "") + (
            "" if self.attention == "flash" else f" {self.attention}")


def problem(layout: Layout, arch, cluster, global_batch: int) -> str | None:
    """Why `layout` cannot run `arch` on `cluster` with `global_batch` sequences (None if it can)."""
    t, p, v = layout.tp, layout.pp, layout.vpp
    if min(t, p, v, layout.cp, layout.ep, layout.dp_shard, layout.dp_replicate, layout.microbatch) < 1:
        return "every degree and the micro-batch must be at least 1"
    for what, value in (("n_heads", arch.n_heads), ("n_kv_heads", arch.n_kv_heads), ("ffn_dim", arch.ffn_dim),
                        ("moe_ffn_dim", arch.moe_ffn_dim if arch.is_moe else t)):
        if value % t:
            return f"tp={t} does not divide the model's {what} ({value}) — choose a tp that divides it"
    if t > cluster.per_node:
        return f"tp={t} spans more than one node of {cluster.per_node} chips — keep tp within a node"
    if layout.world_size != cluster.count:
        return (f"tp*pp*cp*dp_shard*dp_replicate = {layout.world_size} but there are {cluster.count} chips — "
                "make the product equal --count")
    if v > 1 and p == 1:
        return "vpp > 1 needs pipeline parallelism (pp > 1)"
    if p * v > arch.n_layers:
        return f"pp*vpp = {p * v} pipeline stages but the model has {arch.n_layers} layers — use fewer stages"
    if arch.seq_len % layout.cp:
        return f"cp={layout.cp} does not divide seq_len {arch.seq_len}"
    if layout.ep > 1:
        if not arch.is_moe:
            return "ep > 1 needs a mixture-of-experts model (n_routed_experts > 0)"
        if arch.n_routed_experts % layout.ep:
            return f"ep={layout.ep} does not divide n_routed_experts ({arch.n_routed_experts})"
        if layout.shard_group % layout.ep:
            return f"ep={layout.ep} must divide dp_shard*cp = {layout.shard_group} (experts live on those ranks)"
    if layout.zero not in (1, 2, 3):
        return f"zero={layout.zero} — use 1, 2 or 3"
    if layout.recompute not in RECOMPUTE:
        return f"recompute={layout.recompute!r} — use one of {', '.join(RECOMPUTE)}"
    if layout.sequence_parallel and t == 1:
        return "sequence parallelism needs tp > 1"
    if layout.attention not in ATTENTION:
        return f"attention={layout.attention!r} — use one of {', '.join(ATTENTION)}"
    if layout.dtype not in DTYPES:
        return f"dtype={layout.dtype!r} — use one of {', '.join(DTYPES)}"
    if not cluster.row.get(f"{layout.dtype}_tflops"):
        return f"chip {cluster.chip} has no {layout.dtype} peak — pick another --dtype"
    per_step = layout.dp * layout.microbatch
    if global_batch % per_step:
        return (f"global batch {global_batch} is not a multiple of dp*microbatch = {per_step} — change "
                "--global-batch, --microbatch or the dp degrees")
    if p > 1 and layout.microbatches(global_batch) < p:
        return (f"{layout.microbatches(global_batch)} micro-batches per step cannot fill {p} pipeline stages — "
                "raise --global-batch or lower --microbatch or pp")
    return None
