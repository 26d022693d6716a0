"""Memory per device (bytes) of a layout: weights, gradients, optimizer state, working buffers, activations.

Weights (mixed precision, Adam), per parameter held by the device, Z = the ZeRO group (dp_shard x cp):
- zero 3 (zili's FSDP2): fp32 master weight 4/Z, fp32 gradient 4/Z, Adam m and v 8/Z; plus the gathered
  low-precision (2-byte) copies in `buffers`: two blocks in flight (prefetch), or the whole stage when
  pp > 1 (zili keeps a stage's blocks gathered from forward to backward).
- zero 1 / 2 (Megatron-LM style): 2-byte weight + fp32 master 4/Z, fp32 gradient 4 (zero 1) or 4/Z
  (zero 2), Adam 8/Z — 18 bytes per parameter unsharded, the figure Megatron-LM papers use.
Expert weights are split over ep x tp and sharded over Z/ep; everything else over tp and Z. The first stage
holds the embedding, the last the head (also a copy of a tied embedding when pp > 1).

Activations follow Korthikanti et al. 2022 (Reducing Activation Recomputation in Large Transformer Models),
per layer and micro-batch of b sequences of s tokens (s/cp per device; with cp > 1 a layer also keeps the K and V
it gathered from the other cp ranks, (s - s/cp)*b*`kv_bytes_per_token`/t, for the attention's backward), hidden
h, t = tp, a = heads, 2-byte
values: replicated over tp, 8*s*b*h (the norms' inputs, the QKV and first MLP matmuls' inputs), plus the two
1-byte dropout masks 2*s*b*h with `dropout`; split by t, for `gelu` 8*s*b*h + 4*s*b*f (q, k, v, attention
output; GELU input and output) — s*b*h*(10 + 24/t) for f = 4h with dropout, Korthikanti's — and for `swiglu`
2*s*b*(q + 2*kv) + 2*s*b*h + 8*s*b*f (rotated q, k, v; attention output; gate, up, SiLU, product); MoE layers
count the `top_k` + shared experts' tokens. Attention scores: none with a fused (`flash`) kernel; stored
(`materialized`) 5*a*s^2*b/t with dropout (softmax output, mask, dropout output), 2*a*s^2*b/t without.
Sequence parallelism splits the replicated part by t too; selective recomputation drops the scores; full
recomputation keeps only the layer input, 2*s*b*h (/t with sequence parallelism).
The first pipeline stage holds min(m, p) micro-batches of its L/p layers (1F1B), times (1 + (p-1)/(p*v))
when interleaved (v > 1): Korthikanti's formula. The last stage also holds one micro-batch of logits,
6 bytes per vocabulary entry per token / t (2-byte logits + fp32 for the cross-entropy).
"""

from __future__ import annotations

from zili.models import flops
from zili.models.args import ModelArgs
from zili.parallel.layout import Layout
from zili.parallel.pipeline import layer_ranges, stage_ids

BYTES = 2  # activations and gathered weights, bytes per value (bf16 / fp16; fp8 runs keep 2-byte copies)


def layer_indices(args: ModelArgs, layout: Layout, stage: str) -> list[int]:
    """The blocks held by the device of the first or last pipeline rank, as zili's pipeline places them
    (`zili.parallel.pipeline`: contiguous stages, earlier ones larger, stage s on pp rank s % pp)."""
    ranges = layer_ranges(args.n_layers, layout.pp * layout.vpp)
    rank = 0 if stage == "first" else layout.pp - 1
    return [i for s in stage_ids(rank, layout.pp, layout.vpp) for i in ranges[s]]


def layers_on(args: ModelArgs, layout: Layout, stage: str) -> int:
    """Blocks on the first or last pipeline rank's device."""
    return len(layer_indices(args, layout, stage))


def stage_params(args: ModelArgs, layout: Layout, stage: str) -> dict[str, float]:
    """Parameters on one device of the `stage` ("first" | "last"), split by tp/ep, before ZeRO sharding:
    `dense` (sharded over tp) and `expert` (routed experts, over ep x tp)."""
    held = layer_indices(args, layout, stage)
    layers = len(held)
    first_moe = args.n_dense_layers if args.is_moe else args.n_layers
    n_moe = sum(i >= first_moe for i in held)
    n_dense_mlp = layers - n_moe
    dense = layers * (flops.attention_params(args) + 2 * args.dim) + n_dense_mlp * flops.mlp_params(args, False)
    expert = 0.0
    if n_moe:
        routed = flops.routed_expert_params(args)
        dense += n_moe * (flops.mlp_params(args, True) - routed)
        expert = n_moe * routed / (layout.ep * layout.tp)
    emb = args.vocab_size * args.dim
    if stage == "first" or layout.pp == 1:
        dense += emb
    if (stage == "last" or layout.pp == 1) and (not args.tied_embeddings or layout.pp > 1):
        dense += emb + args.dim
    return {"dense": dense / layout.tp, "expert": expert}


def weight_bytes(args: ModelArgs, layout: Layout, stage: str) -> dict[str, float]:
    """params / grads / optimizer / buffers bytes on one device of `stage`, per the ZeRO rules above."""
    p = stage_params(args, layout, stage)
    z = layout.shard_group
    z_expert = max(1, z // layout.ep)
    n = p["dense"] + p["expert"]
    sharded = p["dense"] / z + p["expert"] / z_expert  # parameters this device owns under ZeRO
    if layout.zero == 3:
        params, grads = 4 * sharded, 4 * sharded
        layers = layers_on(args, layout, stage)
        gathered = n if layout.pp > 1 else n * min(layers, 2) / max(layers, 1)
        buffers = BYTES * gathered
    else:
        params, grads, buffers = BYTES * n + 4 * sharded, (4 * n if layout.zero == 1 else 4 * sharded), 0.0
    return {"params": params, "grads": grads, "optimizer": 8 * sharded, "buffers": buffers}


def kv_bytes_per_token(args: ModelArgs) -> float:
    """Bytes of one token's keys and values in one layer (2-byte values): 2 x n_kv_heads x head_dim for grouped-query
    attention; multi-head latent attention's expanded keys and values, n_heads x (qk_head_dim + v_head_dim)."""
    if args.is_mla:
        return BYTES * args.n_heads * (args.qk_head_dim + args.v_head_dim)
    return BYTES * 2 * args.n_kv_heads * args.head_dim


def layer_activation_parts(args: ModelArgs, layout: Layout, seq_len: int,
                           moe: bool = False) -> tuple[float, float]:
    """Activations of one layer for one micro-batch of `seq_len`-token sequences on one device without
    recomputation (bytes): (everything but the attention scores, the attention scores), per the formulas above."""
    s, b, h, t = seq_len / layout.cp, layout.microbatch, args.dim, layout.tp
    div = t if layout.sequence_parallel else 1
    replicated = (10 if args.dropout else 8) * s * b * h
    scores = 0.0
    if layout.attention == "materialized":
        scores = (5 if args.dropout else 2) * args.n_heads * s * s * b / t
    if args.mlp == "gelu":
        gathered = (seq_len - s) * b * kv_bytes_per_token(args)  # context parallelism, as below
        return replicated / div + (8 * s * b * h + 4 * s * b * args.ffn_dim + gathered) / t, scores
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    width = args.ffn_dim if not moe else args.moe_ffn_dim * (args.top_k + args.n_shared_experts)
    split = 2 * s * b * (q + 2 * kv) + 2 * s * b * h + 8 * s * b * width
    # context parallelism: the K and V gathered from the other cp ranks are kept for the attention's backward
    split += (seq_len - s) * b * kv_bytes_per_token(args)
    return replicated / div + split / t, scores


def layer_activation_bytes(args: ModelArgs, layout: Layout, seq_len: int, moe: bool = False) -> float:
    """Activations one layer keeps for one micro-batch on one device (bytes), with the layout's recomputation."""
    if layout.recompute == "full":
        return 2 * seq_len / layout.cp * layout.microbatch * args.dim / (
            layout.tp if layout.sequence_parallel else 1)
    rest, scores = layer_activation_parts(args, layout, seq_len, moe)
    return rest + (0.0 if layout.recompute == "selective" else scores)


def activation_bytes(args: ModelArgs, layout: Layout, seq_len: int, global_batch: int, stage: str = "first") -> float:
    """Activations held at the peak by one device of `stage` (bytes), `global_batch` sequences of `seq_len`
    tokens per step."""
    p, v = layout.pp, layout.vpp
    m = layout.microbatches(global_batch)
    layers = layers_on(args, layout, stage)
    in_flight = 1 if p == 1 else (min(m, p) if stage == "first" else 1)
    factor = 1 + (p - 1) / (p * v) if (v > 1 and stage == "first") else 1.0
    n_moe = flops.moe_layers(args)
    moe_share = n_moe / args.n_layers
    per_layer = (1 - moe_share) * layer_activation_bytes(args, layout, seq_len) + (
        moe_share * layer_activation_bytes(args, layout, seq_len, moe=True) if n_moe else 0)
    total = per_layer * layers * in_flight * factor
    if stage == "last" or p == 1:
        tokens = seq_len / layout.cp * layout.microbatch
        total += 6 * tokens * args.vocab_size / layout.tp
    return total


def memory(args: ModelArgs, layout: Layout, seq_len: int, global_batch: int) -> dict:
    """The per-device breakdown (bytes) of the stage that needs the most: params, grads, optimizer, buffers,
    activations, total, and which `stage` that is; `global_batch` sequences of `seq_len` tokens per step."""
    best = None
    for stage in (("first",) if layout.pp == 1 else ("first", "last")):
        parts = weight_bytes(args, layout, stage)
        parts["activations"] = activation_bytes(args, layout, seq_len, global_batch, stage)
        parts["total"] = sum(parts.values())
        parts["stage"] = stage
        if best is None or parts["total"] > best["total"]:
            best = parts
    return best
