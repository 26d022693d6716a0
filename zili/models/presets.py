"""Named architectures. Parameter counts match the published models (tests assert them within 0.1%).

`tiny` is the CPU demo; its vocabulary comes from the tokenizer (vocab_size 0 = "from the tokenizer").
"""

from __future__ import annotations

from dataclasses import replace

from zili.errors import UserError
from zili.models.args import ModelArgs

_QWEN2 = dict(rope_theta=1_000_000.0, qkv_bias=True, norm_eps=1e-6, max_seq_len=32768)
_LLAMA3 = dict(rope_theta=500_000.0, qkv_bias=False, norm_eps=1e-5, max_seq_len=8192)
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
