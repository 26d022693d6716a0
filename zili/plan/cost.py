"""Step time of a layout (seconds): compute, exposed communication and pipeline bubble.

`step_time(Step(...))` returns a `StepTime`. Each term has its own function, all for one micro-batch on the
slowest pipeline stage's device unless said otherwise: `compute_time` (matmuls, attention and the elementwise
HBM traffic, from the FLOPs of `layer_flops`), `tp_time`, `pipeline_send_time` and `bubble_time`, `expert_time`,
`context_ring_time`, `zero_gather_time` and, once per step, `gradient_sync_time`.

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

from dataclasses import dataclass

from zili.models import flops
from zili.models.args import ModelArgs
from zili.parallel.layout import Layout
from zili.plan import memory
from zili.plan.spec import Cluster

DEFAULT_MATMUL_EFFICIENCY = 0.6  # chips without a calibrated `matmul_efficiency`: an assumption, not a fit
LINK_EFFICIENCY = 0.8  # achieved / nominal bandwidth of NCCL-class collectives (nccl-tests bus bandwidth)
LATENCY_S = 10e-6  # per collective call
TRAFFIC_PER_ACTIVATION_BYTE = 3.0  # HBM bytes the elementwise kernels of a forward pass move per stored byte
FLASH_CAUSAL_SHARE = 0.5  # a fused causal kernel skips the masked half of the score blocks
FLASH_BACKWARD = 2.5  # its backward recomputes the scores: 5 matmuls against the forward's 2 (FlashAttention-2)
RING_FACTOR = {"all_reduce": lambda g: 2 * (g - 1) / g, "all_gather": lambda g: (g - 1) / g,
               "reduce_scatter": lambda g: (g - 1) / g, "all_to_all": lambda g: (g - 1) / g, "p2p": lambda g: 1.0}


@dataclass(frozen=True)
class Step:
    """One optimizer step to time: the model, its sequence length (tokens), the layout, the cluster and the
    global batch (sequences)."""

    args: ModelArgs
    seq_len: int
    layout: Layout
    cluster: Cluster
    global_batch: int

    @property
    def microbatches(self) -> int:
        """Micro-batches each pipeline runs per step."""
        return self.layout.microbatches(self.global_batch)

    @property
    def device_tokens(self) -> float:
        """Tokens of one micro-batch on one device (the cp ranks split each sequence)."""
        return self.layout.microbatch * self.seq_len / self.layout.cp

    @property
    def hidden_bytes(self) -> float:
        """One micro-batch's hidden state on one device (bytes)."""
        return self.device_tokens * self.args.dim * memory.BYTES

    @property
    def flop_rate(self) -> float:
        """Achievable matmul FLOP/s of one chip in the layout's dtype."""
        return self.cluster.peak_flops(self.layout.dtype) * matmul_efficiency(self.cluster)

    @property
    def first_stage_layers(self) -> int:
        """Blocks on the first stage's device (the stage that holds the most)."""
        return memory.layers_on(self.args, self.layout, "first")

    @property
    def moe_share(self) -> float:
        """Fraction of the blocks with a mixture-of-experts MLP."""
        return flops.moe_layers(self.args) / self.args.n_layers

    def bandwidth(self, dim: str, size: int) -> float:
        """Bytes/s per chip of a group of `size` ranks along mesh dimension `dim` (see `strides`)."""
        return link_bandwidth(self.cluster, strides(self.layout)[dim], size)


@dataclass(frozen=True)
class LayerFlops:
    """Hardware FLOPs per token of one block (dense and MoE blocks averaged by their share)."""

    matmul_forward: float  # projections and MLP, forward
    attention_forward: float  # QK^T and AV as the attention kernel runs them, forward
    attention_training: float  # the attention's forward + backward
    recompute: float  # forward work redone in the backward by the layout's recomputation

    @property
    def training(self) -> float:
        """Forward + backward + recomputation."""
        return 3 * self.matmul_forward + self.attention_training + self.recompute


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step and its parts (per step, on the slowest pipeline): `dp_comm_s` holds the
    exposed ZeRO-3 gathers and gradient reduction; `hardware_flops` is the step's, all devices together."""

    step_s: float
    compute_s: float
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    ep_comm_s: float
    cp_comm_s: float
    dp_comm_s: float
    microbatches: int
    hardware_flops: float


def matmul_efficiency(cluster: Cluster) -> float:
    return cluster.row.get("matmul_efficiency") or DEFAULT_MATMUL_EFFICIENCY


def link_bandwidth(cluster: Cluster, stride: int, size: int) -> float:
    """Bytes/s per chip for a group of `size` ranks `stride` apart."""
    if size <= 1:
        return float("inf")
    inside = stride * size <= cluster.per_node
    gbps = cluster.row["scale_up_gbps"] / 2 if inside else cluster.row["scale_out_gbps"]
    return gbps * 1e9 * LINK_EFFICIENCY


def ring_time(kind: str, n_bytes: float, group: int, bandwidth: float) -> float:
    """Seconds of one `kind` collective of `n_bytes` over `group` ranks at `bandwidth` bytes/s per chip."""
    if group <= 1 or n_bytes <= 0:
        return 0.0
    return RING_FACTOR[kind](group) * n_bytes / bandwidth + LATENCY_S


def strides(layout: Layout) -> dict[str, int]:
    """Distance between neighbouring ranks of each mesh dimension (tp innermost)."""
    t, c, d, r = layout.tp, layout.cp, layout.dp_shard, layout.dp_replicate
    return {"tp": 1, "cp": t, "ep": t, "dp_shard": t * c, "dp_replicate": t * c * d, "pp": t * c * d * r}


def layer_flops(step: Step) -> LayerFlops:
    """Per-token FLOPs of one block with the layout's attention kernel and recomputation."""
    args, moe_share = step.args, step.moe_share
    dense = flops.layer_forward_flops(args, step.seq_len)
    moe = flops.layer_forward_flops(args, step.seq_len, moe=True)
    matmul = (1 - moe_share) * dense["matmul"] + moe_share * moe["matmul"]
    flash = step.layout.attention == "flash"
    attention = dense["attention"] * (FLASH_CAUSAL_SHARE if flash else 1.0)
    training = (1 + (FLASH_BACKWARD if flash else 2.0)) * attention
    recompute = {"none": 0.0, "selective": attention, "full": matmul + attention}[step.layout.recompute]
    return LayerFlops(matmul, attention, training, recompute)


# ---- compute


def elementwise_time(step: Step) -> float:
    """Memory-bound elementwise work (norms, activations, softmax, dropout, residuals) of the busiest stage:
    proportional to the bytes a layer would store without recomputation; backward = 2 forwards, and
    recomputation repeats it. 0 for chips without `hbm_tbps`."""
    layout = step.layout
    layers = max(memory.layers_on(step.args, layout, "first"), memory.layers_on(step.args, layout, "last"))
    rest, scores = memory.layer_activation_parts(step.args, layout, step.seq_len)
    redo = {"none": 0.0, "selective": scores, "full": rest + scores}[layout.recompute]
    hbm_bytes_per_s = step.cluster.row.get("hbm_tbps", 0) * 1e12 or float("inf")
    return layers * TRAFFIC_PER_ACTIVATION_BYTE * (3 * (rest + scores) + redo) / hbm_bytes_per_s


def compute_time(step: Step, work: LayerFlops) -> float:
    """Matmul and attention FLOPs of the slowest stage (the first's extra blocks or the last's head) at the
    achievable rate, plus the elementwise time."""
    args, layout = step.args, step.layout
    tp, pipelined = layout.tp, layout.pp > 1
    layer = step.device_tokens * work.training / tp
    head = step.device_tokens * 3 * flops.head_forward_flops(args) / tp
    first = memory.layers_on(args, layout, "first") * layer + (0 if pipelined else head)
    last = memory.layers_on(args, layout, "last") * layer + head
    return max(first, last) / step.flop_rate + elementwise_time(step)


# ---- communication inside a micro-batch


def tp_time(step: Step) -> float:
    """Tensor-parallel all-reduce equivalents of the hidden state: 4 per layer (2 forward, 2 backward), 2 more
    with full recomputation, 1 more with selective recomputation under sequence parallelism."""
    layout = step.layout
    extra = {"none": 0, "selective": 1 if layout.sequence_parallel else 0, "full": 2}[layout.recompute]
    all_reduce = ring_time("all_reduce", step.hidden_bytes, layout.tp, step.bandwidth("tp", layout.tp))
    return step.first_stage_layers * (4 + extra) * all_reduce


def pipeline_send_time(step: Step) -> float:
    """Point-to-point sends between stages: the activation forward and its gradient backward, per virtual
    stage, split over the tp ranks (sequence parallel; Megatron-LM's scatter/gather otherwise)."""
    layout = step.layout
    if layout.pp == 1:
        return 0.0
    send = ring_time("p2p", step.hidden_bytes / layout.tp, layout.pp, step.bandwidth("pp", layout.pp))
    return 2 * layout.vpp * send


def expert_time(step: Step) -> float:
    """Expert all-to-alls: dispatch + combine, forward and backward, per MoE layer on the stage. A placeholder
    (no load imbalance, no capacity factor)."""
    layout = step.layout
    if layout.ep == 1:
        return 0.0
    message = step.hidden_bytes * step.args.top_k / (layout.tp if layout.sequence_parallel else 1)
    all_to_all = ring_time("all_to_all", message, layout.ep, step.bandwidth("ep", layout.ep))
    return step.first_stage_layers * step.moe_share * 4 * all_to_all


def context_ring_time(step: Step, work: LayerFlops) -> float:
    """Context parallelism: K and V of the other cp-1 chunks pass around the ring, forward and twice backward,
    overlapped with the attention compute; the excess is exposed."""
    args, layout = step.args, step.layout
    cp, layers = layout.cp, step.first_stage_layers
    if cp == 1:
        return 0.0
    kv_bytes = step.device_tokens * 2 * args.n_kv_heads * args.head_dim * memory.BYTES / layout.tp
    ring = layers * 3 * (cp - 1) * ring_time("p2p", kv_bytes, cp, step.bandwidth("cp", cp))
    return max(0.0, ring - layers * step.device_tokens * work.attention_training / layout.tp / step.flop_rate)


# ---- data parallelism / ZeRO


def _stage_param_count(step: Step) -> float:
    """Parameters on one first-stage device after tp/ep, before ZeRO."""
    params = memory.stage_params(step.args, step.layout, "first")
    return params["dense"] + params["expert"]


def zero_gather_time(step: Step, compute_s: float) -> float:
    """ZeRO-3 parameter all-gathers of a micro-batch over the shard group (dp_shard x cp ranks, tp apart),
    overlapped with its `compute_s`: forward, and again in backward when resharded after forward (pp = 1)."""
    layout, group = step.layout, step.layout.shard_group
    if layout.zero != 3 or group == 1:
        return 0.0
    gathers = 1 if layout.pp > 1 else 2
    gather = ring_time("all_gather", memory.BYTES * _stage_param_count(step), group, step.bandwidth("cp", group))
    return max(0.0, gathers * gather - compute_s)


def gradient_sync_time(step: Step, compute_s: float) -> float:
    """Once per step: fp32 gradient reduce-scatter in the shard group, all-reduce across replicas, and the
    ZeRO-1/2 weight all-gather, overlapped with the last micro-batch's backward (2/3 of `compute_s`)."""
    layout, group, replicas = step.layout, step.layout.shard_group, step.layout.dp_replicate
    n_params = _stage_param_count(step)
    shard_bandwidth = step.bandwidth("cp", group)
    sync = ring_time("reduce_scatter", 4 * n_params, group, shard_bandwidth)
    sync += ring_time("all_reduce", 4 * n_params / group, replicas, step.bandwidth("dp_replicate", replicas))
    if layout.zero in (1, 2) and group > 1:
        sync += ring_time("all_gather", memory.BYTES * n_params, group, shard_bandwidth)
    return max(0.0, sync - compute_s * 2 / 3)


# ---- the step


def bubble_time(step: Step, microbatch_s: float) -> float:
    """Pipeline fill and drain: (pp - 1) / vpp micro-batch times (interleaved 1F1B)."""
    layout = step.layout
    return (layout.pp - 1) / layout.vpp * microbatch_s if layout.pp > 1 else 0.0


def step_time(step: Step) -> StepTime:
    """Seconds per optimizer step and its parts; see the module doc."""
    count = step.microbatches
    work = layer_flops(step)
    compute_s = compute_time(step, work)
    tp_s, pp_s, ep_s = tp_time(step), pipeline_send_time(step), expert_time(step)
    cp_s, gather_s = context_ring_time(step, work), zero_gather_time(step, compute_s)
    microbatch_s = compute_s + tp_s + pp_s + ep_s + cp_s + gather_s
    bubble_s = bubble_time(step, microbatch_s)
    sync_s = gradient_sync_time(step, compute_s)
    hardware = step.global_batch * step.seq_len * (step.args.n_layers * work.training
                                                   + 3 * flops.head_forward_flops(step.args))
    return StepTime(step_s=count * microbatch_s + bubble_s + sync_s, compute_s=count * compute_s, bubble_s=bubble_s,
                    tp_comm_s=count * tp_s, pp_comm_s=count * pp_s, ep_comm_s=count * ep_s, cp_comm_s=count * cp_s,
                    dp_comm_s=count * gather_s + sync_s, microbatches=count, hardware_flops=hardware)
