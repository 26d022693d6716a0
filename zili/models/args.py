"""ModelArgs: the one description of a decoder architecture, shared by the trainer, the FLOPs accountant
and the planner.

The trainer builds the Llama 3 / Qwen2 block (SwiGLU MLP, no dropout) and its mixture-of-experts variant
(`n_routed_experts > 0`: `top_k` routed experts plus `n_shared_experts` per token, each a SwiGLU of width
`moe_ffn_dim`, routed as `score_func`, `n_group`, `topk_group`, `norm_topk_prob` and `routed_scaling_factor` say —
see zili.models.moe; the first `n_dense_layers` blocks keep a dense MLP). The planner also describes
architectures the trainer does not build, through the same type: `mlp = "gelu"` (the GPT block: h -> ffn -> h
through GELU) and `dropout = True` (dropout masks stored, as the GPT-3-era Megatron-LM runs did).
`buildable_problem()` says what the trainer cannot build.

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
    mlp: str = "swiglu"  # "swiglu" (zili's block) or "gelu" (the GPT block; planner only)
    dropout: bool = False  # dropout masks stored in training (planner only)
    n_routed_experts: int = 0  # mixture of experts (planner only): 0 = a dense model
    n_shared_experts: int = 0
    top_k: int = 0
    moe_ffn_dim: int = 0
    n_dense_layers: int = 0
    # routing (zili.models.moe): "softmax" top-k (Qwen3-MoE, Mixtral) or "sigmoid" scores with group-limited
    # top-k — the best `topk_group` of `n_group` expert groups — and a balancing bias (DeepSeek-V3)
    score_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True  # the top-k weights renormalised to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def validate(self) -> ModelArgs:
        """Raise UserError if the shapes cannot form a model; return self."""
        for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise UserError(f"head size dim/n_heads = {self.head_dim} must be even for RoPE — "
                            "change model.dim or model.n_heads")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}) — "
                "pick n_kv_heads among the divisors of n_heads"
            )
        if self.rope_scaling not in ("none", "llama3"):
            raise UserError(f"rope_scaling {self.rope_scaling!r} is not supported — use 'none' or 'llama3'")
        if self.mlp not in ("swiglu", "gelu"):
            raise UserError(f"mlp must be \"swiglu\" or \"gelu\", got {self.mlp!r}")
        for key in ("n_routed_experts", "n_shared_experts", "top_k", "moe_ffn_dim", "n_dense_layers"):
            if getattr(self, key) < 0:
                raise UserError(f"model.{key} must be zero or more, got {getattr(self, key)}")
        if self.is_moe:
            if not (0 < self.top_k <= self.n_routed_experts and self.moe_ffn_dim > 0):
                raise UserError("a mixture-of-experts model needs 0 < top_k <= n_routed_experts and moe_ffn_dim > 0")
            if self.n_dense_layers >= self.n_layers:
                raise UserError(f"n_dense_layers ({self.n_dense_layers}) leaves no expert layers — lower it")
            if self.score_func not in ("softmax", "sigmoid"):
                raise UserError(f"model.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                raise UserError(f"model.n_routed_experts ({self.n_routed_experts}) must divide into model.n_group "
                                f"({self.n_group}) equal groups — pick n_group among its divisors")
            if not 1 <= self.topk_group <= self.n_group:
                raise UserError(f"model.topk_group ({self.topk_group}) must be between 1 and model.n_group "
                                f"({self.n_group})")
            reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.top_k > reachable:
                raise UserError(f"model.top_k ({self.top_k}) exceeds the {reachable} experts in the "
                                f"{self.topk_group} groups a token may use — lower top_k or raise topk_group")
        return self

    def buildable_problem(self) -> str | None:
        """Why zili's Transformer cannot build this architecture yet (None if it can)."""
        if self.mlp != "swiglu":
            return f"zili's model has SwiGLU MLPs, not {self.mlp!r} (that architecture is for `zili plan` only)"
        if self.dropout:
            return "zili's model has no dropout (dropout = true is for `zili plan` only)"
        return None

    def to_dict(self) -> dict:
        return asdict(self)
