"""ModelArgs: the one description of a decoder architecture, shared by the trainer, the FLOPs accountant
and the planner.

The trainer builds the Llama 3 / Qwen2 / Qwen3 block (SwiGLU MLP, no dropout) and its variants:
- attention: grouped-query attention (`attention = "gqa"`: q/k/v/o projections of `n_heads` / `n_kv_heads` heads
  of `head_dim` features, optionally with Qwen3's per-head q/k RMSNorm, `qk_norm`) or DeepSeek-V2/V3's multi-head
  latent attention (`attention = "mla"`: keys and values expanded from a `kv_lora_rank` latent, a query LoRA of
  rank `q_lora_rank`, heads of `qk_nope_head_dim` + `qk_rope_head_dim` query/key and `v_head_dim` value
  features — see zili.models.mla);
- RoPE: plain, Llama 3's scaling or YaRN (`rope_scaling`);
- feed-forward: dense SwiGLU, or the mixture of experts (`n_routed_experts > 0`: `top_k` routed experts plus
  `n_shared_experts` per token, each a SwiGLU of width `moe_ffn_dim`, routed as `score_func`, `n_group`,
  `topk_group`, `norm_topk_prob` and `routed_scaling_factor` say — see zili.models.moe; the first
  `n_dense_layers` blocks keep a dense MLP). The planner also describes
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
    # RoPE scaling: "none"; "llama3" stretches low frequencies by `rope_factor` (Llama 3.1); "yarn" (Peng et al.
    # 2023; DeepSeek-V3, Qwen3 long context) interpolates by `rope_factor` the frequencies too slow to turn
    # `rope_beta_slow` times in `rope_original_max_len` positions, keeps those turning more than
    # `rope_beta_fast` times, ramps in between, and scales cos/sin by its attention factor (from `rope_mscale`
    # and `rope_mscale_all_dim`; MLA also scales its softmax by mscale(rope_mscale_all_dim)^2)
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0  # 0 = not given
    rope_mscale_all_dim: float = 0.0
    attention: str = "gqa"  # "gqa" (grouped-query) or "mla" (multi-head latent attention)
    head_size: int = 0  # features per GQA head; 0 = dim // n_heads (Qwen3 sets it: 0.6B has 16 heads of 128)
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head before the rotation
    # multi-head latent attention (attention = "mla")
    q_lora_rank: int = 0  # 0 = a plain query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # MLA's rotated features pair (2i, 2i+1), as DeepSeek's checkpoints have them
    # DeepSeek-V3's multi-token prediction: 1 = one extra block predicting the token after next (see
    # zili.models.transformer.MultiTokenPredictor); trained with `training.mtp_loss_weight`
    mtp_depth: int = 0
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
        """Features per GQA head (MLA: see qk_head_dim, v_head_dim)."""
        return self.head_size or self.dim // self.n_heads

    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Features per head in q·k: head_dim for GQA, nope + rope for MLA."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Features per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def validate(self) -> ModelArgs:
        """Raise UserError if the shapes cannot form a model; return self."""
        for key in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.attention not in ("gqa", "mla"):
            raise UserError(f"model.attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.head_size < 0:
            raise UserError(f"model.head_size must be zero (dim / n_heads) or positive, got {self.head_size}")
        if not self.is_mla and not self.head_size and self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}) — "
                            "or set model.head_size")
        if self.is_mla:
            self._validate_mla()
        if self.mtp_depth not in (0, 1):
            raise UserError(f"model.mtp_depth must be 0 (off) or 1 (DeepSeek-V3's depth), got {self.mtp_depth}")
        if self.rope_dim % 2:
            raise UserError(f"the rotated features per head ({self.rope_dim}) must be even for RoPE — "
                            "change model.dim or model.n_heads (MLA: model.qk_rope_head_dim)")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}) — "
                "pick n_kv_heads among the divisors of n_heads"
            )
        if self.rope_scaling not in ("none", "llama3", "yarn"):
            raise UserError(f"rope_scaling {self.rope_scaling!r} is not supported — use 'none', 'llama3' or 'yarn'")
        if self.rope_scaling == "yarn" and not (self.rope_factor >= 1 and self.rope_original_max_len > 0):
            raise UserError("YaRN needs rope_factor >= 1 and rope_original_max_len > 0")
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

    def _validate_mla(self) -> None:
        dims = {k: getattr(self, k) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        if any(v <= 0 for v in dims.values()) or self.q_lora_rank < 0:
            given = ", ".join(f"{k}={v}" for k, v in dims.items())
            raise UserError(f"multi-head latent attention needs positive kv_lora_rank, qk_nope_head_dim, "
                            f"qk_rope_head_dim and v_head_dim and q_lora_rank >= 0 (0 = no query LoRA); got {given}, "
                            f"q_lora_rank={self.q_lora_rank}")
        if self.qkv_bias or self.qk_norm or self.head_size:
            raise UserError("model.qkv_bias, model.qk_norm and model.head_size belong to grouped-query attention — "
                            "leave them unset with attention = 'mla'")
        if self.n_kv_heads != self.n_heads:
            raise UserError(f"multi-head latent attention expands keys and values for every head: set model.n_kv_heads "
                            f"= model.n_heads ({self.n_heads}), got {self.n_kv_heads}")

    def buildable_problem(self) -> str | None:
        """Why zili's Transformer cannot build this architecture yet (None if it can)."""
        if self.mlp != "swiglu":
            return f"zili's model has SwiGLU MLPs, not {self.mlp!r} (that architecture is for `zili plan` only)"
        if self.dropout:
            return "zili's model has no dropout (dropout = true is for `zili plan` only)"
        return None

    def to_dict(self) -> dict:
        return asdict(self)
