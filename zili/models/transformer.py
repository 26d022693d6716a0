"""A decoder-only transformer covering the Llama 3, Qwen2, Qwen3 (dense and MoE) and DeepSeek-V2/V3 families,
in plain PyTorch.

RMSNorm -> attention with RoPE -> RMSNorm -> feed-forward, each with a residual connection. Attention is
grouped-query (optional q/k/v bias as in Qwen2, per-head q/k RMSNorm as in Qwen3) or multi-head latent attention
(zili.models.mla); the feed-forward is a SwiGLU or a mixture of SwiGLU experts (zili.models.moe); the output head
is tied or untied. Attention, RMSNorm and the rotation go through
`zili.kernels`, which picks the kernel for the device (scaled_dot_product_attention by default, batched
matmuls for CPU training, torch_npu's fused kernels on Ascend, flash-attn on CUDA if installed).

Rotary layout: half-split (GPT-NeoX / Hugging Face), i.e. the feature pairs rotated together are
(i, i + head_dim/2), not the interleaved (2i, 2i+1) pairs of Meta's original checkpoints. Hugging Face
weights therefore load without permuting q/k rows (MLA de-interleaves DeepSeek's pairs at run time, see there).

Contract: `Transformer(args)(tokens[B, T], start_pos=0, cache=None) -> logits[B, T, vocab]`; with
`positions=` spans (zili.models.positions) instead of start_pos, the columns hold those positions and attention
is causal by position over the keys each attention's `key_context` supplies (by default the input's own).
The model knows nothing of parallelism: FSDP, tensor/pipeline parallelism, activation checkpointing and
compilation are applied from outside (zili.parallel). A pipeline stage is the same class with some parts
removed: without `embed` its input is the hidden state (B, T, dim) instead of token ids, without `norm`
it returns the hidden state instead of logits. It can be built on the meta device and materialised later
with `to_empty(device=...)` followed by `init_weights()`; each parameter's initial value depends only on
the seed and its name (`initial_value`), so every layout and every pipeline stage starts from the same
weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zili import kernels
from zili.models import init
from zili.models.args import ModelArgs
from zili.models.mla import LatentAttention, LatentCache
from zili.models.moe import MoE
from zili.models.positions import (
    Documents,
    KeyContext,
    Spans,
    causal_attention,
    check_spans,
    document_positions,
    rope_rows,
)
from zili.models.rmsnorm import RMSNorm
from zili.models.rope import rope_table


def canonical_name(name: str) -> str:
    """A parameter's name without the wrapper prefixes that activation checkpointing or torch.compile insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class KVCache:
    """Keys and values of past positions for generation with grouped-query attention: per layer
    (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    @staticmethod
    def bytes_per_token(args: ModelArgs, element_bytes: int = 2) -> int:
        """Cache bytes per token of context (all layers) at `element_bytes` per number."""
        return args.n_layers * 2 * args.n_kv_heads * args.head_dim * element_bytes

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v for positions start..start+T; return all keys/values up to start+T."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: q/k/v/o projections, optional q/k/v bias (Qwen2) and per-head q/k RMSNorm before
    the rotation (Qwen3)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.key_context = KeyContext()

    def forward(self, x, rope: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0,
                positions: Spans | Documents | None = None):
        """x (B, T, dim); rope the model's (2, max_seq_len, head_dim) cos/sin table; positions start at
        `start_pos`, or are `positions` (spans; then no cache): attention over the keys and values `key_context`
        returns, causal by position. Head counts come from the projections' outputs (a tensor-parallel shard has
        fewer)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = rope_rows(rope, positions or (range(start_pos, start_pos + T),))
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
        if positions is not None:
            key_spans, k, v = self.key_context(positions, k, v)
            out = causal_attention(q, k, v, positions, key_spans)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(layer, start_pos, k.to(cache.k[layer].dtype), v.to(cache.v[layer].dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
            if start_pos > 0:  # queries at start_pos.. see every cached key up to their own position
                causal = False
                key_pos = torch.arange(k.shape[2], device=x.device)
                query_pos = torch.arange(start_pos, start_pos + T, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]
        out = kernels.attention(q, k, v, mask, causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = LatentAttention(args) if args.is_mla else Attention(args)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        if args.is_moe and layer >= args.n_dense_layers:
            shared = SwiGLU(args.dim, args.n_shared_experts * args.moe_ffn_dim) if args.n_shared_experts else None
            self.mlp = MoE(args, shared)
        else:
            self.mlp = SwiGLU(args.dim, args.ffn_dim)

    def forward(self, x, rope, cache: KVCache | LatentCache | None = None, start_pos: int = 0,
                positions: Spans | Documents | None = None):
        # positions by keyword: tensor parallelism's input plan covers the five positional arguments
        x = x + self.attn(self.attn_norm(x), rope, cache, self.layer, start_pos, positions=positions)
        return x + self.mlp(self.mlp_norm(x))


class MultiTokenPredictor(nn.Module):
    """DeepSeek-V3's multi-token prediction (depth 1): for position i, the main model's normalised final hidden
    state h_i and the embedding of token i+1, each RMS-normalised (`hnorm`, `enorm`), concatenated [embedding,
    hidden] and projected back to `dim` (`eh_proj`), go through one more block (`layer` = n_layers: an expert
    block in a mixture-of-experts model) and a final norm; the shared output head then predicts token i+2."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(args, args.n_layers)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, embedded_next: torch.Tensor, hidden: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """embedded_next (B, T-1, dim): embeddings of tokens 1..T-1; hidden (B, T-1, dim): the main model's normalised
        final hidden states at positions 0..T-2 -> (B, T-1, dim) for the head."""
        x = self.eh_proj(torch.cat([self.enorm(embedded_next), self.hnorm(hidden)], dim=-1))
        return self.norm(self.block(x, rope))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if why := args.buildable_problem():
            raise ValueError(why)
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed "0".."n-1" keeps parameter names stable when a pipeline stage drops blocks.
        self.blocks = nn.ModuleDict({str(i): Block(args, i) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = None if args.tied_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleDict({str(i): MultiTokenPredictor(args) for i in range(args.mtp_depth)}) or None
        self.register_buffer("rope", rope_table(args), persistent=False)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache | LatentCache:
        """An empty generation cache for `batch` sequences of up to `max_len` tokens: keys and values (GQA) or
        latents and rotated keys (MLA)."""
        kind = LatentCache if self.args.is_mla else KVCache
        return kind(self.args, batch, max_len, device, dtype)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | LatentCache | None = None,
                mtp: bool = False, positions: Spans | None = None, documents: torch.Tensor | None = None):
        """Logits (B, T, vocab); with `mtp` (a model with `mtp_depth` 1, no cache) also the multi-token
        prediction's logits (B, T-1, vocab), position i predicting token i+2. `positions`: the spans of positions
        the T columns hold (zili.models.positions), instead of start_pos .. start_pos + T - 1. `documents`: (B, T)
        document ids of packed rows (zili.models.positions.document_positions): positions restart with each
        document and attention stays inside it. Neither with a cache or `mtp` (whose one-column shift needs
        consecutive positions), nor both at once."""
        T = tokens.shape[1]
        end = start_pos + T
        if documents is not None:
            if positions is not None:
                raise ValueError("documents and positions cannot be combined")
            positions = document_positions(documents)
        if positions is not None:
            if cache is not None or mtp:
                raise ValueError("positions cannot be combined with a generation cache or multi-token prediction")
            end = positions.end if isinstance(positions, Documents) else check_spans(positions, T)
        if end > self.args.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len {self.args.max_seq_len}")
        h = self.embed(tokens) if self.embed is not None else tokens
        for block in self.blocks.values():
            h = block(h, self.rope, cache, start_pos, positions=positions)
        if self.norm is None:
            return h
        h = self.norm(h)
        logits = self.head(h)
        if not mtp:
            return logits
        return logits, self.head(self.mtp["0"](self.embed(tokens[:, 1:]), h[:, :-1], self.rope))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of normalised hidden states: the output head, or the embedding when tied."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.embed.weight)

    def initial_value(self, name: str, shape, seed: int, offsets=None, sizes=None, device=None) -> torch.Tensor:
        """The initial value of the region `offsets`/`sizes` (default: all) of parameter `name` (canonical) of
        full `shape`: fp32, on `device` (default CPU). Ones for norms, zeros for biases, near-normal with std
        0.02 otherwise (output projections 0.02 / sqrt(2 n_layers)), each element a function of (seed, name,
        its index) only — so it does not depend on which other parameters exist or how they are sharded
        (see zili.models.init)."""
        return init.initial_value(name, shape, seed, self.args.n_layers, offsets, sizes, device)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The buffers' starting values (after `to_empty` they hold garbage): the RoPE table, and for expert
        layers a zero balancing bias and load count."""
        self.rope.copy_(rope_table(self.args, device=self.rope.device))
        for module in self.modules():
            if isinstance(module, MoE):
                if module.gate.e_score_correction_bias is not None:
                    module.gate.e_score_correction_bias.zero_()
                module.tokens_per_expert.zero_()

    def expert_layers(self) -> list[MoE]:
        """The mixture-of-experts feed-forwards of this model (part)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Set every parameter to its `initial_value` and the buffers to theirs (`init_buffers`), e.g. after
        `to_empty`. (Sharded parameters are initialised shard by shard by `zili.parallel.init.init_weights`.)"""
        self.init_buffers()
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(canonical_name(name), p.shape, seed, device=p.device))
