"""Step time of a layout (seconds): compute, exposed communication and pipeline bubble.

Compute. A device's FLOPs for one micro-batch are its share (1/(tp*cp)) of its stage's layers' forward
(zili.models.flops: matmuls + attention) times 3 for forward + backward, plus the recomputed forward: all of
it for `full`, the attention part for `selective` (hardware FLOPs, reported apart from model FLOPs). The
attention depends on the kernel: materialized scores cost the unmasked QK^T and AV, forward + backward 3x; a
fused causal kernel (`flash`) skips the masked half, and its backward, which recomputes the scores, costs
2.5 forwards (FlashAttention-2: 5 matmuls against 2). The last stage adds the head. Time =
FLOPs / (chip peak in the run's dtype x `matmul_efficiency`), the achievable fraction of the datasheet peak
for large transformer matmuls: a per-chip constant (`matmul_efficiency` in the chip row, else
`DEFAULT_MATMUL_EFFICIENCY`), calibrated once for the A100 on the published runs (docs/planner.md).

Links. A collective over a group inside one node runs at the chip's scale-up bandwidth (half the quoted
both-directions figure), one that crosses nodes at its scale-out bandwidth per chip (one NIC per chip), both
times LINK_EFFICIENCY, plus LATENCY_S per call. Ring costs over g ranks for n bytes: all-reduce
2(g-1)/g*n/bw, all-gather / reduce-scatter / all-to-all (g-1)/g*n/bw, point-to-point n/bw.

Overlap assumptions (what is exposed):
- tensor parallel all-reduces (or all-gather + reduce-scatter with sequence parallelism): 2 per layer per
  forward, 2 per backward, 2 more for full recomputation, 1 all-reduce-equivalent more for selective
  recomputation with sequence parallelism (the all-gather is redone): never overlapped.
- pipeline sends between stages (forward activation, backward gradient, per virtual stage): exposed.
- expert all-to-alls (dispatch + combine, forward and backward): exposed. Context-parallel K/V ring passes:
  overlapped with the attention compute, the excess exposed.
- ZeRO-3 parameter all-gathers of a micro-batch overlap its compute (prefetch); the excess is exposed.
- gradient reduction (reduce-scatter in the shard group, all-reduce across replicas) and the ZeRO-1/2 weight
  all-gather run once per step and overlap the backward of the last micro-batch; the excess is exposed.
Pipeline: step = (m + (p-1)/v) x the slowest stage's micro-batch time, i.e. the bubble is (p-1)/(v*m) of
the busy time (Narayanan et al. 2021).
"""

from __future__ import annotations

from zili.models import flops
from zili.plan import memory

DEFAULT_MATMUL_EFFICIENCY = 0.6  # chips without a calibrated `matmul_efficiency`: an assumption, not a fit
LINK_EFFICIENCY = 0.8  # achieved / nominal bandwidth of NCCL-class collectives (nccl-tests bus bandwidth)
LATENCY_S = 10e-6  # per collective call
TRAFFIC_PER_ACTIVATION_BYTE = 3.0  # HBM bytes the elementwise kernels of a forward pass move per stored byte
FLASH_CAUSAL_SHARE = 0.5  # a fused causal kernel skips the masked half of the score blocks
FLASH_BACKWARD = 2.5  # its backward recomputes the scores: 5 matmuls against the forward's 2 (FlashAttention-2)


def matmul_efficiency(cluster) -> float:
    return cluster.row.get("matmul_efficiency") or DEFAULT_MATMUL_EFFICIENCY


def _bandwidth(cluster, stride: int, size: int) -> float:
    """Bytes/s per chip for a group of `size` ranks `stride` apart."""
    if size <= 1:
        return float("inf")
    inside = stride * size <= cluster.per_node
    gbps = cluster.row["scale_up_gbps"] / 2 if inside else cluster.row["scale_out_gbps"]
    return gbps * 1e9 * LINK_EFFICIENCY


def _ring(kind: str, n: float, g: int, bw: float) -> float:
    if g <= 1 or n <= 0:
        return 0.0
    factor = {"all_reduce": 2 * (g - 1) / g, "all_gather": (g - 1) / g, "reduce_scatter": (g - 1) / g,
              "all_to_all": (g - 1) / g, "p2p": 1.0}[kind]
    return factor * n / bw + LATENCY_S


def strides(layout) -> dict[str, int]:
    """Distance between neighbouring ranks of each mesh dimension (tp innermost)."""
    t, c, d, r = layout.tp, layout.cp, layout.dp_shard, layout.dp_replicate
    return {"tp": 1, "cp": t, "ep": t, "dp_shard": t * c, "dp_replicate": t * c * d, "pp": t * c * d * r}


def step_time(arch, cluster, layout, global_batch: int) -> dict:
    """Seconds per optimizer step and its parts: compute, tp/pp/ep/cp/dp communication exposed, bubble;
    plus `hardware_flops` (per step, all devices)."""
    t, p, v, c, e = layout.tp, layout.pp, layout.vpp, layout.cp, layout.ep
    s, b = arch.seq_len, layout.microbatch
    m = layout.microbatches(global_batch)
    rate = cluster.peak_flops(layout.dtype) * matmul_efficiency(cluster)
    st = strides(layout)
    tokens = b * s / c  # tokens of one micro-batch on one device

    # compute per micro-batch on the slowest stage
    n_moe = flops.moe_layers(arch)
    moe_share = n_moe / arch.n_layers
    dense, moe = flops.layer_forward_flops(arch, s), flops.layer_forward_flops(arch, s, moe=True)
    fwd_matmul = (1 - moe_share) * dense["matmul"] + moe_share * moe["matmul"]
    flash = layout.attention == "flash"
    fwd_attn = dense["attention"] * (FLASH_CAUSAL_SHARE if flash else 1.0)
    attn_train = (1 + (FLASH_BACKWARD if flash else 2.0)) * fwd_attn  # forward + backward
    recompute = {"none": 0.0, "selective": fwd_attn, "full": fwd_matmul + fwd_attn}[layout.recompute]
    layer_flops = tokens * (3 * fwd_matmul + attn_train + recompute) / t  # one device, one micro-batch
    head_flops = tokens * 3 * flops.head_forward_flops(arch) / t
    stage_flops = max(memory.layers_on(arch, layout, "first") * layer_flops + (head_flops if p == 1 else 0),
                      memory.layers_on(arch, layout, "last") * layer_flops + head_flops)
    layers_max = max(memory.layers_on(arch, layout, "first"), memory.layers_on(arch, layout, "last"))
    # memory-bound elementwise work (norms, activations, softmax, dropout, residuals): proportional to the
    # bytes a layer would store without recomputation; backward = 2 forwards; recomputation repeats it
    rest, scores = memory.layer_activation_parts(arch, layout)
    redo = {"none": 0.0, "selective": scores, "full": rest + scores}[layout.recompute]
    elementwise_mb = layers_max * TRAFFIC_PER_ACTIVATION_BYTE * (3 * (rest + scores) + redo) / (
        cluster.row.get("hbm_tbps", 0) * 1e12 or float("inf"))
    compute_mb = stage_flops / rate + elementwise_mb
    layers = memory.layers_on(arch, layout, "first")

    # tensor parallel: all-reduce equivalents of one micro-batch's hidden state per layer
    n_act = tokens * arch.dim * memory.BYTES
    k = 4 + {"none": 0, "selective": 1 if layout.sequence_parallel else 0, "full": 2}[layout.recompute]
    tp_mb = layers * k * _ring("all_reduce", n_act, t, _bandwidth(cluster, st["tp"], t))
    # pipeline sends: activation forward and gradient backward, per virtual stage
    n_p2p = n_act / t  # split over the tp ranks (sequence parallel; Megatron-LM's scatter/gather otherwise)
    pp_mb = 2 * v * _ring("p2p", n_p2p, p, _bandwidth(cluster, st["pp"], p)) if p > 1 else 0.0
    # expert all-to-all: dispatch + combine, forward and backward, per MoE layer on the stage
    ep_mb = 0.0
    if e > 1:
        n_a2a = n_act * arch.top_k / (t if layout.sequence_parallel else 1)
        ep_mb = layers * moe_share * 4 * _ring("all_to_all", n_a2a, e, _bandwidth(cluster, st["ep"], e))
    # context parallel: K and V of the other cp-1 chunks pass around the ring, forward and twice backward
    cp_mb = 0.0
    if c > 1:
        n_kv = tokens * 2 * arch.n_kv_heads * arch.head_dim * memory.BYTES / t
        ring = layers * 3 * (c - 1) * _ring("p2p", n_kv, c, _bandwidth(cluster, st["cp"], c))
        cp_mb = max(0.0, ring - layers * tokens * attn_train / t / rate)

    # ZeRO-3 parameter all-gathers per micro-batch, overlapped with that micro-batch's compute
    z = layout.shard_group
    params = memory.stage_params(arch, layout, "first")
    n_params = params["dense"] + params["expert"]
    bw_z = _bandwidth(cluster, st["cp"], z)  # the (dp_shard, cp) ranks: z of them, tp apart
    dp_mb = 0.0
    if layout.zero == 3 and z > 1:
        gathers = 1 if p > 1 else 2  # forward, and again in backward when resharded after forward
        dp_mb = max(0.0, gathers * _ring("all_gather", memory.BYTES * n_params, z, bw_z) - compute_mb)

    mb_time = compute_mb + tp_mb + pp_mb + ep_mb + cp_mb + dp_mb
    busy = m * mb_time
    bubble = (p - 1) / v * mb_time if p > 1 else 0.0

    # once per step: gradient reduction (+ ZeRO-1/2 weight all-gather), overlapped with the last backward
    r = layout.dp_replicate
    grad_sync = _ring("reduce_scatter", 4 * n_params, z, bw_z)
    grad_sync += _ring("all_reduce", 4 * n_params / z, r, _bandwidth(cluster, st["dp_replicate"], r))
    if layout.zero in (1, 2) and z > 1:
        grad_sync += _ring("all_gather", memory.BYTES * n_params, z, bw_z)
    dp_step = max(0.0, grad_sync - compute_mb * 2 / 3)

    step = busy + bubble + dp_step
    hardware = global_batch * s * (arch.n_layers * (3 * fwd_matmul + attn_train + recompute)
                                   + 3 * flops.head_forward_flops(arch))
    return {
        "step_s": step,
        "compute_s": m * compute_mb,
        "bubble_s": bubble,
        "tp_comm_s": m * tp_mb,
        "pp_comm_s": m * pp_mb,
        "ep_comm_s": m * ep_mb,
        "cp_comm_s": m * cp_mb,
        "dp_comm_s": m * dp_mb + dp_step,
        "microbatches": m,
        "hardware_flops": hardware,
    }
