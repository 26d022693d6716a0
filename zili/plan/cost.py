"""Step time of a layout (seconds): compute, exposed communication and pipeline bubble.

`step_time(Step(...))` returns a `StepTime`. Each term has its own function, all for one micro-batch on the
slowest pipeline stage's device unless said otherwise: `compute_time` (matmuls, attention and the elementwise
HBM traffic, from the FLOPs of `layer_flops`), `tp_time`, `pipeline_send_time` and `bubble_time`, `expert_time`,
`context_time`, `zero_gather_time` and, once per step, `gradient_sync_time`.

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
both-directions figure). A ring collective that crosses nodes runs at the scale-out bandwidth per chip (one NIC
per chip) times the group's ranks on one node, at most the scale-up bandwidth (`link_bandwidth`); an expert
all-to-all sends each rank's off-node bytes through its own NIC. All times LINK_EFFICIENCY, plus LATENCY_S per
call. Ring costs over g ranks for n bytes: all-reduce
2(g-1)/g*n/bw, all-gather / reduce-scatter / all-to-all (g-1)/g*n/bw, point-to-point n/bw.

Overlap assumptions (what is exposed):
- tensor parallel all-reduces (or all-gather + reduce-scatter with sequence parallelism): 2 per layer per
  forward, 2 per backward, 2 more for full recomputation, 1 all-reduce-equivalent more for selective
  recomputation with sequence parallelism (the all-gather is redone): never overlapped.
- pipeline sends between stages (forward activation, backward gradient, per virtual stage): exposed.
- expert all-to-alls (dispatch + combine, forward and backward; `expert_time`): the chip row's
  `all_to_all_exposed` share of their time is exposed (1 where not calibrated). A token's copies go
  to its top_k experts; those on other nodes cross the scale-out links, the rest stay on the scale-up links
  (the two run at once: the slower sets the time). Node-limited routing (DeepSeek-V3: n_group groups of
  experts, one group per node, a token visits at most topk_group of them) caps the nodes a token is sent to.
  `Step.moe_imbalance` (>= 1: the busiest expert rank's tokens over the mean) scales the routed-expert compute
  and the all-to-all bytes of the slowest rank.
- context parallelism (`context_time`, the Llama 3 approach): each layer all-gathers K and V over the cp
  ranks in the forward and reduce-scatters their gradients in the backward (again gathered when full
  recomputation redoes the forward): exposed.
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
    moe_imbalance: float = 1.0  # busiest expert rank's routed tokens / the mean (1.0 = perfectly balanced)

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
    imbalance_extra: float = 0.0  # routed-expert work the busiest expert rank does beyond the mean

    @property
    def training(self) -> float:
        """Forward + backward + recomputation (+ the busiest expert rank's extra work)."""
        return 3 * self.matmul_forward + self.attention_training + self.recompute + self.imbalance_extra


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


def all_to_all_exposed(cluster: Cluster) -> float:
    """Share of the expert all-to-all time that is not hidden (the chip row's `all_to_all_exposed`, else 1)."""
    return cluster.row.get("all_to_all_exposed") or 1.0


def link_bandwidth(cluster: Cluster, stride: int, size: int) -> float:
    """Bytes/s per chip of a ring collective over a group of `size` ranks `stride` apart. Inside one node: the
    scale-up link. Across nodes: the group's `local` ranks on each node share that node's traffic between them,
    each through its own NIC (NCCL runs one ring per NIC and relays inside the node over the scale-up links),
    so a ring that crosses a node boundary moves local x one NIC's bandwidth, at most the scale-up link's."""
    if size <= 1:
        return float("inf")
    up = cluster.row["scale_up_gbps"] / 2
    if stride * size <= cluster.per_node:
        return up * 1e9 * LINK_EFFICIENCY
    local = max(1, min(size, cluster.per_node // stride))
    return min(up, local * cluster.row["scale_out_gbps"]) * 1e9 * LINK_EFFICIENCY


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
    routed = moe_share * 2 * args.top_k * flops.expert_params(args)  # forward FLOPs per token in routed experts
    passes = 4 if step.layout.recompute == "full" else 3
    return LayerFlops(matmul, attention, training, recompute, (step.moe_imbalance - 1) * passes * routed)


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


def moe_remote_share(step: Step) -> float:
    """Of a token's top_k expert copies, the share sent to other nodes over the scale-out links: the ep group
    spans `nodes` nodes (ep ranks t apart); a token reaches at most min(top_k, node limit) of them — the node
    limit is topk_group when the router is group-limited with one group per node (n_group = nodes), else no
    limit — and each is remote with probability (nodes - 1) / nodes."""
    args, layout, per_node = step.args, step.layout, step.cluster.per_node
    nodes = max(1, layout.ep * strides(layout)["ep"] // per_node)
    if nodes == 1:
        return 0.0
    limit = args.topk_group if (args.n_group > 1 and args.topk_group < args.n_group and args.n_group == nodes) \
        else nodes
    return min(args.top_k, limit) * (nodes - 1) / nodes / args.top_k


def expert_time(step: Step) -> float:
    """Expert all-to-alls per MoE layer on the stage: dispatch + combine, forward and backward (4; 6 with full
    recomputation, whose forward redoes them). Each sends the micro-batch's hidden states x top_k (/tp with
    sequence parallelism) x the imbalance; the copies to other nodes go over the scale-out links, the rest
    over the scale-up links, at once (the slower one sets the time). Times the chip's `all_to_all_exposed`."""
    layout = step.layout
    if layout.ep == 1:
        return 0.0
    message = step.hidden_bytes * step.args.top_k * step.moe_imbalance / (
        layout.tp if layout.sequence_parallel else 1)
    remote = moe_remote_share(step)
    factor = RING_FACTOR["all_to_all"](layout.ep)
    up = step.cluster.row["scale_up_gbps"] / 2 * 1e9 * LINK_EFFICIENCY
    out = step.cluster.row["scale_out_gbps"] * 1e9 * LINK_EFFICIENCY
    one = factor * max(message * remote / out, message * (1 - remote) / up) + LATENCY_S
    passes = 6 if layout.recompute == "full" else 4
    return step.first_stage_layers * step.moe_share * passes * one * all_to_all_exposed(step.cluster)


def context_time(step: Step) -> float:
    """Context parallelism, per layer: all-gather of the key material over the cp ranks (each holds s/cp tokens
    of a sequence) in the forward, reduce-scatter of its gradient in the backward, and the all-gather again when
    full recomputation redoes the forward. What zili's trainer gathers: K and V (heads split over tp), or for
    multi-head latent attention the latent and the shared rope key (kv_lora_rank + qk_rope_head_dim values per
    token), which each rank then expands itself. Exposed."""
    layout, args = step.layout, step.args
    cp = layout.cp
    if cp == 1:
        return 0.0
    if args.is_mla:
        per_token = memory.BYTES * (args.kv_lora_rank + args.qk_rope_head_dim)
    else:
        per_token = memory.kv_bytes_per_token(args) / layout.tp
    gathered = cp * step.device_tokens * per_token  # the whole sequence's key material
    bandwidth = step.bandwidth("cp", cp)
    passes = ring_time("all_gather", gathered, cp, bandwidth) + ring_time("reduce_scatter", gathered, cp, bandwidth)
    if layout.recompute == "full":
        passes += ring_time("all_gather", gathered, cp, bandwidth)
    return step.first_stage_layers * passes


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
    cp_s, gather_s = context_time(step), zero_gather_time(step, compute_s)
    microbatch_s = compute_s + tp_s + pp_s + ep_s + cp_s + gather_s
    bubble_s = bubble_time(step, microbatch_s)
    sync_s = gradient_sync_time(step, compute_s)
    hardware = step.global_batch * step.seq_len * (step.args.n_layers * work.training
                                                   + 3 * flops.head_forward_flops(step.args))
    return StepTime(step_s=count * microbatch_s + bubble_s + sync_s, compute_s=count * compute_s, bubble_s=bubble_s,
                    tp_comm_s=count * tp_s, pp_comm_s=count * pp_s, ep_comm_s=count * ep_s, cp_comm_s=count * cp_s,
                    dp_comm_s=count * gather_s + sync_s, microbatches=count, hardware_flops=hardware)
