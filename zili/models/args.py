"""ModelArgs: the one description of a decoder architecture (Llama 3 and Qwen2 families).

All sizes are counts (layers, heads, features, tokens); nothing here allocates memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zili.errors import UserError


@dataclass
class ModelArgs:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tied_embeddings: bool = False
    norm_eps: float = 1e-6
    max_seq_len: int = 4096  # longest position the RoPE table covers (tokens)
    # Llama 3 RoPE scaling ("llama3") stretches low frequencies by `rope_factor`; "none" leaves them.
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> "ModelArgs":
        """Raise UserError if the shapes cannot form a model; return self."""
        for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise UserError(f"head size dim/n_heads = {self.head_dim} must be even for RoPE — change model.dim or model.n_heads")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}) — "
                "pick n_kv_heads among the divisors of n_heads"
            )
        if self.rope_scaling not in ("none", "llama3"):
            raise UserError(f"rope_scaling {self.rope_scaling!r} is not supported — use 'none' or 'llama3'")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
