"""The one parallel layout type and the one set of rules that make a layout possible, for the trainer, the
planner and `zili plan --verify` alike.

Ranks are laid out outermost first as pp, dp_replicate, dp_shard, cp, tp — tensor parallelism innermost, so a
tp group is neighbouring ranks in one node (zili's DeviceMesh).
Expert parallelism (ep) reuses the dp_shard x cp ranks, as torchtitan does. The data-parallel degree is
dp = dp_replicate * dp_shard: ranks with the same dp coordinate see the same data. Each pipeline runs
`microbatches = global_batch / (dp * microbatch)` micro-batches of `microbatch` sequences per optimizer step.
`zero` is the ZeRO stage over the dp_shard x cp group (zili's FSDP2 is stage 3). `vpp` is the number of
pipeline stages each pp rank holds (virtual stages of the interleaved schedules).

`problem()` holds the rules every layout obeys (degrees, divisibility, stage count, batch split);
`trainer_problem()` adds what zili's trainer does not run yet (the planner still plans those layouts).
Both return one line — what is wrong and how to fix it — or None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zili.models.args import ModelArgs

RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("flash", "materialized")  # a fused kernel that never stores the scores (SDPA, FlashAttention) or not
DTYPES = ("bf16", "fp16", "fp8", "fp32")
DEGREES = ("tp", "pp", "vpp", "cp", "ep", "dp_shard", "dp_replicate")


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
        """Data-parallel degree: how many different slices of the global batch are trained at once."""
        return self.dp_shard * self.dp_replicate

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded (FSDP2) over the data-parallel and context-parallel ranks."""
        return self.dp * self.cp > 1

    @property
    def shard_group(self) -> int:
        """Ranks that split parameters / optimizer state under ZeRO (dp_shard x cp, as FSDP2 over both)."""
        return self.dp_shard * self.cp

    def microbatches(self, global_batch: int) -> int:
        """Micro-batches each pipeline runs per optimizer step."""
        return global_batch // (self.dp * self.microbatch)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"v{self.vpp}" if self.vpp > 1 else "")]
        parts += [f"{k}{getattr(self, k)}" for k in ("cp", "ep") if getattr(self, k) > 1]
        parts += [f"dps{self.dp_shard}", f"dpr{self.dp_replicate}", f"mb{self.microbatch}", self.recompute]
        return " ".join(parts) + (" sp" if self.sequence_parallel else "") + (
            "" if self.attention == "flash" else f" {self.attention}")


def problem(layout: Layout, args: ModelArgs, *, world_size: int | None = None, seq_len: int | None = None,
            global_batch: int | None = None) -> str | None:
    """Why `layout` cannot run `args` (on `world_size` ranks, at `seq_len` tokens, with `global_batch`
    sequences per step, each checked when given); None if it can."""
    t, p, v = layout.tp, layout.pp, layout.vpp
    if min(getattr(layout, k) for k in (*DEGREES, "microbatch")) < 1:
        return "every degree and the micro-batch must be at least 1"
    for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("ffn_dim", args.ffn_dim),
                        ("moe_ffn_dim", args.moe_ffn_dim if args.is_moe else t)):
        if value % t:
            return f"tp={t} does not divide the model's {what} ({value}) — choose a tp that divides {what}"
    if world_size is not None and layout.world_size != world_size:
        return (f"the layout needs tp*pp*cp*dp_shard*dp_replicate = {layout.world_size} ranks but there are "
                f"{world_size} — make the product of the degrees equal the number of ranks")
    if v > 1 and p == 1:
        return "more than one pipeline stage per rank (vpp > 1) needs pipeline parallelism (pp > 1)"
    if p * v > args.n_layers:
        return (f"pp={p} with {v} stage(s) per rank makes {p * v} pipeline stages but the model has {args.n_layers} "
                f"layers — use at most {args.n_layers} stages")
    if seq_len is not None and layout.cp > 1 and seq_len % (2 * layout.cp):
        return (f"cp={layout.cp} cuts each sequence into 2*cp = {2 * layout.cp} equal chunks (causal load balancing) "
                f"but seq_len {seq_len} is not a multiple of {2 * layout.cp} — choose a seq_len or cp that fits")
    if layout.ep > 1:
        if not args.is_moe:
            return "ep > 1 needs a mixture-of-experts model (n_routed_experts > 0) — set ep=1 for a dense model"
        if args.n_routed_experts % layout.ep:
            return (f"ep={layout.ep} does not divide n_routed_experts ({args.n_routed_experts}) — choose an ep that "
                    "divides the expert count")
        if layout.shard_group % layout.ep:
            return (f"ep={layout.ep} must divide dp_shard*cp = {layout.shard_group}, the ranks the experts are spread "
                    "over — choose an ep that divides it, or more data ranks")
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
    if global_batch is not None:
        per_step = layout.dp * layout.microbatch
        if global_batch % per_step:
            return (f"the global batch of {global_batch} sequences is not a multiple of dp*microbatch = "
                    f"{layout.dp}*{layout.microbatch} — change the batch, the micro-batch or the dp degrees")
        if p > 1 and layout.microbatches(global_batch) < p:
            return (f"{layout.microbatches(global_batch)} micro-batches per step cannot fill {p} pipeline stages — "
                    "use at least as many micro-batches as pipeline ranks")
    return None


def trainer_problem(layout: Layout, args: ModelArgs) -> str | None:
    """Why zili's trainer cannot run `layout` on `args` yet, beyond `problem()` (None if it can)."""
    if layout.cp > 1 and layout.pp > 1:
        return "zili's trainer does not combine context parallelism with pipeline parallelism yet — set cp=1 or pp=1"
    if layout.cp > 1 and args.mtp_depth:
        return ("context parallelism has no path for multi-token prediction (its one-position shift pairs neighbouring "
                "tokens, which the load-balanced chunks separate) — set cp=1 or model.mtp_depth=0")
    if layout.zero != 3 and layout.shard_group > 1:
        return f"zili's trainer shards with FSDP2 (ZeRO-3), not ZeRO-{layout.zero} — use zero=3"
    if layout.recompute == "selective":
        return "zili's trainer recomputes whole blocks or nothing — use recompute full or none"
    if layout.tp > 1 and args.vocab_size % layout.tp:
        return (f"tp={layout.tp} does not divide the model's vocab_size ({args.vocab_size}) — the embedding and the "
                "head are split by vocabulary rows: choose a tp that divides it")
    if (args.is_mla or args.qk_norm) and layout.tp > 1:
        return ("zili has no tensor-parallel plan for multi-head latent attention or Qwen3's q/k-norm attention yet "
                "(data, context, expert and pipeline parallelism run them) — set tp=1")
    if args.mtp_depth and layout.world_size > 1:
        return ("zili trains multi-token prediction in one process for now (no parallel layout carries its extra "
                "layer yet) — run a single process, or set model.mtp_depth=0")
    if layout.pp > 1 and args.tied_embeddings:
        return ("pipeline parallelism needs an output head of its own (the embedding lives on the first stage) — "
                "set model.tied_embeddings=false or pp=1")
    return args.buildable_problem()
