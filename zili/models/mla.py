"""Multi-head latent attention (DeepSeek-V2 and V3), free of parallelism like the rest of the model.

Per token, with h heads:
- query: `q_a_proj` (dim -> q_lora_rank) -> RMSNorm `q_a_layernorm` -> `q_b_proj` (-> h x (nope + rope)), or one
  `q_proj` when q_lora_rank = 0 (DeepSeek-V2-Lite);
- `kv_a_proj_with_mqa` (dim -> kv_lora_rank + rope): a latent c (kv_lora_rank features, then RMSNorm
  `kv_a_layernorm`) and one rotated key k_rope shared by every head (rope features);
- `kv_b_proj` expands c into each head's unrotated key (nope features) and value (v_head_dim features);
- head i attends with q_i = [q_nope_i, rope(q_rope_i)] against k_i = [k_nope_i, rope(k_rope)], softmax scale
  1/sqrt(nope + rope) (times mscale(rope_mscale_all_dim)^2 under YaRN), and `o_proj` maps h x v_head_dim to dim.

Rotary layout: DeepSeek's checkpoints pair the rotated features (2i, 2i+1) (`rope_interleave`); the rope
features are de-interleaved to zili's half-split layout ([evens, odds]) before rotating — the same permutation
for queries and keys, so q·k is unchanged and the weights load as they are published.

With explicit `positions` (spans, zili.models.positions) the key material handed to `key_context` is also the
latent and k_rope — what a context-parallel gather then moves: kv_lora_rank + rope numbers per token instead of
h x (nope + rope + v) (576 against 40,960 for DeepSeek-V3), each rank expanding the gathered latents itself.

Generation caches what the keys and values are computed from — the normalised latent and the rotated k_rope,
kv_lora_rank + rope numbers per token and layer — not the expanded keys and values (h x (nope + rope + v)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zili import kernels
from zili.models.args import ModelArgs
from zili.models.positions import Documents, KeyContext, Spans, causal_attention, rope_rows
from zili.models.rmsnorm import RMSNorm
from zili.models.rope import yarn_mscale

LORA_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm and kv_a_layernorm use the default eps, not rms_norm_eps


class LatentCache:
    """For generation with MLA: per layer the normalised latent (B, max_len, kv_lora_rank) and the rotated shared
    key (B, 1, max_len, qk_rope_head_dim)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        self.latent = [torch.zeros(batch, max_len, args.kv_lora_rank, device=device, dtype=dtype)
                       for _ in range(args.n_layers)]
        self.k_rope = [torch.zeros(batch, 1, max_len, args.qk_rope_head_dim, device=device, dtype=dtype)
                       for _ in range(args.n_layers)]

    @staticmethod
    def bytes_per_token(args: ModelArgs, element_bytes: int = 2) -> int:
        """Cache bytes per token of context (all layers) at `element_bytes` per number."""
        return args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * element_bytes

    def update(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor):
        """Store positions start..start+T; return the latents and rotated keys of positions 0..start+T."""
        end = start + latent.shape[1]
        self.latent[layer][:, start:end] = latent
        self.k_rope[layer][:, :, start:end] = k_rope
        return self.latent[layer][:, :end], self.k_rope[layer][:, :, :end]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., d) with pairs (2i, 2i+1) -> (..., d) with pairs (i, i + d/2): [evens, odds]."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class LatentAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h, qk = args.n_heads, args.qk_head_dim
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, h * qk, bias=False)
        else:
            self.q_proj = nn.Linear(args.dim, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * args.v_head_dim, args.dim, bias=False)
        self.scale = 1.0 / math.sqrt(qk)
        if args.rope_scaling == "yarn" and args.rope_mscale_all_dim:
            self.scale *= yarn_mscale(args.rope_factor, args.rope_mscale_all_dim) ** 2
        self.key_context = KeyContext()

    def forward(self, x, rope: torch.Tensor, cache: LatentCache | None = None, layer: int = 0, start_pos: int = 0,
                positions: Spans | Documents | None = None):
        """x (B, T, dim); rope the model's (2, max_seq_len, qk_rope_head_dim) table; positions from `start_pos`, or
        `positions` (spans; then no cache): attention over the latents and rotated keys `key_context` returns,
        causal by position."""
        a = self.args
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if a.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, -1, a.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.view(B, 1, T, a.qk_rope_head_dim)
        if a.rope_interleave:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        cos, sin = rope_rows(rope, positions or (range(start_pos, start_pos + T),))
        q_rope, k_rope = kernels.apply_rope(q_rope, cos, sin), kernels.apply_rope(k_rope, cos, sin)
        mask, causal, key_spans = None, True, None
        if positions is not None:
            key_spans, latent, k_rope = self.key_context(positions, latent, k_rope)
        elif cache is not None:
            latent, k_rope = cache.update(layer, start_pos, latent.to(cache.latent[layer].dtype),
                                          k_rope.to(cache.k_rope[layer].dtype))
            if start_pos > 0:  # queries at start_pos.. see every cached key up to their own position
                causal = False
                mask = torch.arange(latent.shape[1], device=x.device)[None, :] <= torch.arange(
                    start_pos, start_pos + T, device=x.device)[:, None]
        S = latent.shape[1]
        kv = self.kv_b_proj(latent.to(q.dtype)).view(B, S, -1, a.qk_nope_head_dim + a.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.to(k_nope.dtype).expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope.to(q_nope.dtype)], dim=-1)
        if positions is not None:
            out = causal_attention(q, k, v, positions, key_spans, scale=self.scale)
        else:
            out = kernels.attention(q, k, v, mask, causal, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
