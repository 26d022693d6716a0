"""Tensor parallelism (Megatron-style) with sequence parallelism, through DTensor's `parallelize_module`.

Per block: q/k/v and gate/up projections are split by output features (ColwiseParallel: whole heads, whole
SwiGLU columns per rank), o_proj and down_proj by input features (RowwiseParallel), so each block needs
one all-reduce forward and one backward. With `sequence_parallel` the norms and the residual stream are
split along the sequence instead of replicated: the all-reduce becomes a reduce-scatter after the block
and an all-gather before the next matmul (same bytes, 1/tp of the activation memory outside matmuls).
The embedding is split by vocabulary rows; the output head by vocabulary columns, and its logits stay
vocabulary-sharded for the loss-parallel cross-entropy (`torch.distributed.tensor.parallel.loss_parallel`),
so no rank ever holds the full (tokens x vocab) logits. With tied embeddings the head multiplies by the
(row-sharded) embedding weight, which gives the same vocabulary-sharded logits.
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from zili.models.moe import MoE


def _replicated_output(tp_mesh):
    """A forward hook making the final norm's output a replicated DTensor (the head's input)."""

    def hook(module, inputs, output):
        if isinstance(output, DTensor):
            return output.redistribute(placements=[Replicate()])
        return DTensor.from_local(output, tp_mesh, [Replicate()], run_check=False)

    return hook


def apply_tensor_parallel(model, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) over the 1-D `tp_mesh`, in place."""
    sp = sequence_parallel
    between_blocks = Shard(1) if sp else Replicate()  # layout of the residual stream
    top = {}
    if model.embed is not None:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks)
    if model.norm is not None:
        if sp:
            top["norm"] = SequenceParallel()
        if model.lm_head is not None:
            top["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                             use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    if model.norm is not None:
        model.norm.register_forward_hook(_replicated_output(tp_mesh))

    for block in model.blocks.values():
        plan = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=between_blocks),
        }
        if isinstance(block.mlp, MoE):
            plan.update(_moe_plan(block.mlp, between_blocks))
        else:
            plan.update({
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=between_blocks),
            })
        if sp:
            plan.update({
                "attn_norm": SequenceParallel(),
                "mlp_norm": SequenceParallel(),
                # attention(x, rope, cache, layer, start_pos): gather x along the sequence, leave the rest
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                           desired_input_layouts=(Replicate(), None, None, None, None)),
            })
            if not isinstance(block.mlp, MoE):
                plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, plan)


def _moe_plan(moe: MoE, between_blocks) -> dict:
    """A mixture-of-experts feed-forward under tensor parallelism: every tp rank routes the whole (gathered)
    sequence and computes the routed experts whole (expert parallelism, not tp, splits them); the shared
    experts split like a dense SwiGLU. Plain tensors inside; the output goes back to the residual's layout."""
    plan = {"mlp": PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),),
                                      use_local_output=True)}
    if between_blocks != Replicate():
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(between_blocks,), use_local_output=True)
    if moe.shared_experts is not None:
        plan.update({
            "mlp.shared_experts.gate_proj": ColwiseParallel(),
            "mlp.shared_experts.up_proj": ColwiseParallel(),
            "mlp.shared_experts.down_proj": RowwiseParallel(output_layouts=Replicate()),
        })
    return plan
