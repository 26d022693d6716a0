"""Named architectures. Parameter counts match the published models (tests assert them within 0.1%).

`tiny` is the CPU demo; its vocabulary comes from the tokenizer (vocab_size 0 = "from the tokenizer").
"""

from __future__ import annotations

from dataclasses import replace

from zili.errors import UserError
from zili.models.args import ModelArgs

_QWEN2 = dict(rope_theta=1_000_000.0, qkv_bias=True, norm_eps=1e-6, max_seq_len=32768)
_LLAMA3 = dict(rope_theta=500_000.0, qkv_bias=False, norm_eps=1e-5, max_seq_len=8192)
_QWEN3 = dict(rope_theta=1_000_000.0, norm_eps=1e-6, max_seq_len=40960, head_size=128, qk_norm=True)
_QWEN3_MOE = dict(_QWEN3, n_routed_experts=128, top_k=8, score_func="softmax", norm_topk_prob=True)
# DeepSeek-V3's attention (MLA, YaRN to 160 K) and feed-forward shape (256 + 1 experts of 2048, top 8 of 4 groups)
_DEEPSEEK_MLA = dict(attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, norm_eps=1e-6, rope_theta=10000.0, rope_scaling="yarn", rope_factor=40.0,
                     rope_original_max_len=4096, rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=1.0,
                     rope_mscale_all_dim=1.0, max_seq_len=163840)
_LLAMA31_SCALING = dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_len=8192, max_seq_len=131072)

PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(n_layers=4, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=768, vocab_size=0,
                      rope_theta=10000.0, tied_embeddings=True, max_seq_len=1024),
    # `tiny` with DeepSeek-V3's feed-forward: a dense first block, then 16 routed experts (4 groups, 2 of them
    # eligible per token, top 4, sigmoid scores with the balancing bias) and one shared expert
    "tiny-moe": ModelArgs(n_layers=4, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=768, vocab_size=0,
                          rope_theta=10000.0, tied_embeddings=True, max_seq_len=1024, n_routed_experts=16,
                          n_shared_experts=1, top_k=4, moe_ffn_dim=192, n_dense_layers=1, score_func="sigmoid",
                          n_group=4, topk_group=2, routed_scaling_factor=2.5),
    # Qwen2 (Qwen Team 2024, config.json of Qwen/Qwen2-*): 0.494 B, 1.544 B, 7.616 B, 72.71 B parameters.
    "qwen2-0.5b": ModelArgs(n_layers=24, dim=896, n_heads=14, n_kv_heads=2, ffn_dim=4864, vocab_size=151936,
                            tied_embeddings=True, **_QWEN2),
    "qwen2-1.5b": ModelArgs(n_layers=28, dim=1536, n_heads=12, n_kv_heads=2, ffn_dim=8960, vocab_size=151936,
                            tied_embeddings=True, **_QWEN2),
    "qwen2-7b": ModelArgs(n_layers=28, dim=3584, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064,
                          **_QWEN2),
    "qwen2-72b": ModelArgs(n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=29568, vocab_size=152064,
                           **_QWEN2),
    # Llama 3 (Meta 2024): 8.030 B, 70.55 B; the 405 B model exists only as Llama 3.1 (with RoPE scaling).
    "llama3-8b": ModelArgs(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                           **_LLAMA3),
    "llama3-70b": ModelArgs(n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
                            **_LLAMA3),
    "llama3-405b": ModelArgs(n_layers=126, dim=16384, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                             vocab_size=128256, **{**_LLAMA3, **_LLAMA31_SCALING}),
    # Qwen3 (Qwen Team 2025, config.json of Qwen/Qwen3-*): per-head q/k RMSNorm, no q/k/v bias, heads of 128.
    # 0.6B: 0.44 B non-embedding parameters (the total is published rounded to 0.6 B); 8B: 8.2 B.
    "qwen3-0.6b": ModelArgs(n_layers=28, dim=1024, n_heads=16, n_kv_heads=8, ffn_dim=3072, vocab_size=151936,
                            tied_embeddings=True, **_QWEN3),
    "qwen3-8b": ModelArgs(n_layers=36, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=12288, vocab_size=151936,
                          **_QWEN3),
    # Qwen3-MoE: every block a mixture of 128 experts, top 8, softmax routing, no shared expert.
    # 30B-A3B: 30.5 B total, 3.3 B active; 235B-A22B: 235 B total, 22 B active.
    "qwen3-30b-a3b": ModelArgs(n_layers=48, dim=2048, n_heads=32, n_kv_heads=4, ffn_dim=6144, vocab_size=151936,
                               moe_ffn_dim=768, **_QWEN3_MOE),
    "qwen3-235b-a22b": ModelArgs(n_layers=94, dim=4096, n_heads=64, n_kv_heads=4, ffn_dim=12288, vocab_size=151936,
                                 moe_ffn_dim=1536, **_QWEN3_MOE),
    # DeepSeek-V3 (DeepSeek-AI 2024, config.json of deepseek-ai/DeepSeek-V3): 671 B total, 37 B active (the
    # main model; the published checkpoint adds a 14 B multi-token-prediction layer). R1 has the same shape.
    "deepseek-v3": ModelArgs(n_layers=61, dim=7168, n_heads=128, n_kv_heads=128, ffn_dim=18432, vocab_size=129280,
                             n_routed_experts=256, n_shared_experts=1, top_k=8, moe_ffn_dim=2048, n_dense_layers=3,
                             score_func="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5,
                             **_DEEPSEEK_MLA),
    # DeepSeek-V2-Lite (DeepSeek-AI 2024): 15.7 B total, 2.4 B active; MLA without a query LoRA, softmax routing
    # of 64 experts (top 6, not renormalised) plus 2 shared.
    "deepseek-v2-lite": ModelArgs(n_layers=27, dim=2048, n_heads=16, n_kv_heads=16, ffn_dim=10944,
                                  vocab_size=102400, n_routed_experts=64, n_shared_experts=2, top_k=6,
                                  moe_ffn_dim=1408, n_dense_layers=1, score_func="softmax", norm_topk_prob=False,
                                  **{**_DEEPSEEK_MLA, "q_lora_rank": 0, "rope_mscale": 0.707,
                                     "rope_mscale_all_dim": 0.707}),
    # Kimi K2 (Moonshot AI 2025): DeepSeek-V3's architecture at 1.04 T total, 32 B active — 384 experts,
    # 64 heads, one dense block, no expert groups.
    "kimi-k2": ModelArgs(n_layers=61, dim=7168, n_heads=64, n_kv_heads=64, ffn_dim=18432, vocab_size=163840,
                         n_routed_experts=384, n_shared_experts=1, top_k=8, moe_ffn_dim=2048, n_dense_layers=1,
                         score_func="sigmoid", routed_scaling_factor=2.827,
                         **{**_DEEPSEEK_MLA, "rope_theta": 50000.0, "rope_factor": 32.0, "rope_beta_fast": 1.0,
                            "max_seq_len": 131072}),
    # dense-1t: 1.013 T parameters with the depth and width of Megatron-LM's 1 T GPT (Narayanan et al. 2021:
    # 128 layers, dim 25,600, 160 heads) in zili's architecture: SwiGLU, RoPE, GQA with 8 KV heads, untied
    # head (pipeline stages need their own), Llama 3 vocabulary; ffn_dim 84,480 (330 x 256) brings the block
    # to ~12 dim^2 parameters like the GPT original. A planning target (`zili plan`), not a checkpoint.
    "dense-1t": ModelArgs(n_layers=128, dim=25600, n_heads=160, n_kv_heads=8, ffn_dim=84480, vocab_size=128256,
                          rope_theta=500_000.0, norm_eps=1e-5, max_seq_len=4096),
}


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of the named preset; UserError listing the names if unknown."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r} — choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name])


def resolve(model_cfg, tokenizer_vocab: int | None = None) -> ModelArgs:
    """Preset + the non-None overrides of a `ModelConfig`; vocab 0 takes the tokenizer's (rounded up to 64)."""
    overrides = {k: v for k, v in vars(model_cfg).items() if k not in ("preset", "init") and v is not None}
    args = replace(get_preset(model_cfg.preset), **overrides)
    if args.vocab_size == 0:
        if tokenizer_vocab is None:
            raise UserError(f"preset {model_cfg.preset!r} takes its vocabulary from the tokenizer — "
                            "set model.vocab_size")
        args.vocab_size = -(-tokenizer_vocab // 64) * 64
    if tokenizer_vocab is not None and tokenizer_vocab > args.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model only {args.vocab_size} — "
            f"set --model.vocab_size={tokenizer_vocab} or use a smaller tokenizer"
        )
    return args.validate()
