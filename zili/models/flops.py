"""The ONE parameter and FLOPs accountant, used by MFU logging, `zili bench` and `zili plan`.

Model FLOPs per token (training, forward + backward), following the PaLM appendix B convention:

    flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

- N_matmul counts every weight that takes part in a matrix multiply for each token: the q/k/v/o and
  SwiGLU projections of every block plus the output head (the tied embedding counts here once, as the
  head). The input embedding lookup is not a matmul and is excluded; norms and biases are negligible.
- 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
- The attention term counts QK^T and AV (2 x 2 x seq_len x head_dim per head, times 3 for forward and
  backward) without halving for the causal mask, as PaLM and torchtitan do.
Recomputation (activation checkpointing) is hardware work, not model work, and is not counted.
"""

from __future__ import annotations

from zili.models.args import ModelArgs


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters by part: embedding, attention, mlp, norms, head (0 when tied), total."""
    hd = args.head_dim
    q_out, kv_out = args.n_heads * hd, args.n_kv_heads * hd
    attn = args.dim * q_out + 2 * args.dim * kv_out + q_out * args.dim
    if args.qkv_bias:
        attn += q_out + 2 * kv_out
    mlp = 3 * args.dim * args.ffn_dim
    norms = 2 * args.dim * args.n_layers + args.dim
    embedding = args.vocab_size * args.dim
    head = 0 if args.tied_embeddings else args.vocab_size * args.dim
    counts = {
        "embedding": embedding,
        "attention": attn * args.n_layers,
        "mlp": mlp * args.n_layers,
        "norms": norms,
        "head": head,
    }
    counts["total"] = sum(counts.values())
    return counts


def matmul_params(args: ModelArgs) -> int:
    """Weights used in a matmul per token: block projections plus the output head (tied or not)."""
    hd = args.head_dim
    per_layer = 2 * args.dim * args.n_heads * hd + 2 * args.dim * args.n_kv_heads * hd + 3 * args.dim * args.ffn_dim
    return per_layer * args.n_layers + args.vocab_size * args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training model FLOPs per token (forward + backward) at sequence length `seq_len`."""
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6.0 * matmul_params(args) + attention
