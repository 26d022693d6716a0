"""The ONE parameter and FLOPs accountant, used by MFU logging, `zili bench` and `zili plan`.

It reads one architecture type, `zili.models.args.ModelArgs`, for the trainer and the planner alike: the planner
also counts what the trainer does not build yet (a GELU MLP, mixture-of-experts layers). Counts are numbers of
weights; FLOPs are per token.

Model FLOPs per token (training, forward + backward), following the PaLM appendix B convention:

    flops_per_token = 6 * N_matmul + 6 * n_layers * n_heads * (qk_head_dim + v_head_dim) * seq_len

- N_matmul counts every weight that takes part in a matrix multiply for each token: the attention projections
  (q/k/v/o; for multi-head latent attention q_a/q_b or q, kv_a, kv_b — which expands every token's latent —
  and o) and MLP projections of every block (for MoE layers: the router, the shared experts and the `top_k`
  routed experts a token visits) plus the output head (the tied embedding counts here once, as the head). The
  input embedding lookup is not a matmul and is excluded; norms and biases are negligible.
- 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
- The attention term counts QK^T and AV (2 x seq_len x (qk_head_dim + v_head_dim) per head — 4 x seq_len x
  head_dim for grouped-query attention — times 3 for forward and backward) without halving for the causal
  mask, as PaLM, Megatron-LM and torchtitan do.
Recomputation (activation checkpointing) is hardware work, not model work, and is not counted here; the
planner adds it as hardware FLOPs from the forward terms below.
"""

from __future__ import annotations

from zili.models.args import ModelArgs


def moe_layers(args: ModelArgs) -> int:
    """How many blocks have a mixture-of-experts MLP (the first `n_dense_layers` stay dense)."""
    return args.n_layers - args.n_dense_layers if args.is_moe else 0


def value_head_dim(args: ModelArgs) -> int:
    """Features per head in the attention values (and the output projection's input)."""
    return args.v_head_dim if args.is_mla else args.head_dim


def attention_params(args: ModelArgs, bias: bool = True) -> int:
    """Projection weights of one block's attention (+ the q/k/v bias if the model has one and `bias`): q/k/v/o
    for grouped-query attention; q_a/q_b (or q), kv_a, kv_b and o for multi-head latent attention."""
    h, o_params = args.n_heads, args.n_heads * value_head_dim(args) * args.dim
    if args.is_mla:
        q_out = h * args.qk_head_dim
        q = args.dim * args.q_lora_rank + args.q_lora_rank * q_out if args.q_lora_rank else args.dim * q_out
        kv = (args.dim * (args.kv_lora_rank + args.qk_rope_head_dim)
              + args.kv_lora_rank * h * (args.qk_nope_head_dim + args.v_head_dim))
        return q + kv + o_params
    q_out, kv_out = h * args.head_dim, args.n_kv_heads * args.head_dim
    params = args.dim * q_out + 2 * args.dim * kv_out + o_params
    if bias and args.qkv_bias:
        params += q_out + 2 * kv_out
    return params


def attention_norm_params(args: ModelArgs) -> int:
    """Norm weights inside one block's attention: MLA's q_a/kv_a norms, Qwen3's per-head q/k norms."""
    if args.is_mla:
        return args.q_lora_rank + args.kv_lora_rank
    return 2 * args.head_dim if args.qk_norm else 0


def attention_scores_flops(args: ModelArgs, seq_len: int) -> float:
    """Forward FLOPs per token of one block's QK^T and AV at `seq_len` (no halving for the causal mask)."""
    return 2.0 * seq_len * args.n_heads * (args.qk_head_dim + value_head_dim(args))


def _ffn_params(args: ModelArgs, width: int) -> int:
    """One MLP of hidden width `width`: 3 matrices for SwiGLU, 2 for GELU."""
    return (3 if args.mlp == "swiglu" else 2) * args.dim * width


def mlp_params(args: ModelArgs, moe: bool) -> int:
    """MLP weights of one block: dense, or (moe=True) router + shared + all routed experts."""
    if not moe:
        return _ffn_params(args, args.ffn_dim)
    expert = _ffn_params(args, args.moe_ffn_dim)
    return args.dim * args.n_routed_experts + (args.n_shared_experts + args.n_routed_experts) * expert


def routed_expert_params(args: ModelArgs) -> int:
    """Routed-expert weights of one MoE block (the part expert parallelism splits)."""
    return args.n_routed_experts * _ffn_params(args, args.moe_ffn_dim)


def expert_params(args: ModelArgs) -> int:
    """Weights of one routed (or shared) expert: an MLP of width `moe_ffn_dim` (0 for a dense model)."""
    return _ffn_params(args, args.moe_ffn_dim) if args.is_moe else 0


def mlp_active_params(args: ModelArgs, moe: bool) -> int:
    """MLP weights one token multiplies with in one block."""
    if not moe:
        return _ffn_params(args, args.ffn_dim)
    return args.dim * args.n_routed_experts + (args.n_shared_experts + args.top_k) * _ffn_params(args, args.moe_ffn_dim)


def _mtp_block_is_moe(args: ModelArgs) -> bool:
    return args.is_moe and args.n_layers >= args.n_dense_layers  # the block after the last is an expert block


def mtp_params(args: ModelArgs) -> int:
    """Weights of the multi-token prediction layers (eh_proj, one block, three norms each; the head is shared)."""
    block = (attention_params(args) + mlp_params(args, _mtp_block_is_moe(args))
             + 2 * args.dim + attention_norm_params(args))
    return args.mtp_depth * (2 * args.dim * args.dim + block + 3 * args.dim)


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters by part: embedding, attention, mlp, norms, head (0 when tied), mtp (multi-token prediction),
    total."""
    n_moe = moe_layers(args)
    mlp = (args.n_layers - n_moe) * mlp_params(args, False) + (n_moe * mlp_params(args, True) if n_moe else 0)
    embedding = args.vocab_size * args.dim
    counts = {
        "embedding": embedding,
        "attention": attention_params(args) * args.n_layers,
        "mlp": mlp,
        "norms": (2 * args.dim + attention_norm_params(args)) * args.n_layers + args.dim,
        "head": 0 if args.tied_embeddings else embedding,
        "mtp": mtp_params(args),
    }
    counts["total"] = sum(counts.values())
    return counts


def active_params(args: ModelArgs) -> int:
    """Parameters one token uses: the total less the routed experts it does not visit (the embedding table counted
    whole, as in the total). MFU counts `matmul_params` instead."""
    expert_blocks = moe_layers(args) + (args.mtp_depth if _mtp_block_is_moe(args) else 0)
    unvisited = expert_blocks * (args.n_routed_experts - args.top_k) * _ffn_params(args, args.moe_ffn_dim)
    return param_counts(args)["total"] - unvisited


def layer_forward_flops(args: ModelArgs, seq_len: int, moe: bool = False) -> dict[str, float]:
    """Forward FLOPs per token of one block: `matmul` (projections and MLP) and `attention` (QK^T and AV)."""
    matmul = 2 * (attention_params(args, bias=False) + mlp_active_params(args, moe))
    return {"matmul": float(matmul), "attention": attention_scores_flops(args, seq_len)}


def head_forward_flops(args: ModelArgs) -> float:
    """Forward FLOPs per token of the output head (logits)."""
    return 2.0 * args.vocab_size * args.dim


def matmul_params(args: ModelArgs) -> int:
    """Weights used in a matmul per token: block projections plus the output head (tied or not); with multi-token
    prediction also its projection, block and second use of the head."""
    n_moe = moe_layers(args)
    mlp = (args.n_layers - n_moe) * mlp_active_params(args, False) + (
        n_moe * mlp_active_params(args, True) if n_moe else 0)
    head = args.vocab_size * args.dim
    mtp = args.mtp_depth * (2 * args.dim * args.dim + attention_params(args, bias=False)
                            + mlp_active_params(args, _mtp_block_is_moe(args)) + head)
    return attention_params(args, bias=False) * args.n_layers + mlp + head + mtp


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training model FLOPs per token (forward + backward) at sequence length `seq_len`."""
    return 6.0 * matmul_params(args) + 3 * (args.n_layers + args.mtp_depth) * attention_scores_flops(args, seq_len)
