"""Tiny random Hugging Face models built by `transformers` inside the tests (nothing is downloaded)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 320


def _tokenizer(out: Path) -> None:
    from zili.data.tokenizer import train_bpe

    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    train_bpe([text], 300).save(out)


# YaRN stretching 64 positions 4x, with DeepSeek-V3's magnitude corrections: the 200 tested positions need it
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def _moe_families(kind: str, common: dict):
    """Qwen3 (q/k norm, head_dim 32 != 64 / 4), Qwen3-MoE (8 softmax-routed experts, top 2) or DeepSeek-V3 (MLA
    with a query LoRA and YaRN; 8 sigmoid-routed experts in 2 groups, 1 eligible, top 2, a shared expert, a dense
    first block, a random balancing bias)."""
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e6))
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1e6))
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **{**common, "num_hidden_layers": 3}, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=20,
        routed_scaling_factor=2.5, rope_parameters=dict(YARN), tie_word_embeddings=False))
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
            layer.mlp.gate.weight.normal_(0, 0.5)  # decisive routing: ties between experts would be chance
    return model


def build_hf(kind: str, out: Path, **save_kwargs) -> Path:
    """A Qwen2 (tied embeddings, q/k/v bias, GQA), a Llama (untied, Llama 3 rope scaling, GQA 4:1), or a Qwen3,
    Qwen3-MoE or DeepSeek-V3 (see `_moe_families`) with random weights, saved with its tokenizer into `out`."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if kind in ("qwen3", "qwen3_moe", "deepseek_v3"):
        model = _moe_families(kind, common)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}))
    model.save_pretrained(out, **save_kwargs)
    _tokenizer(out)
    return out


FAMILIES = ("qwen2", "llama", "qwen3", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: build_hf(kind, root / kind) for kind in FAMILIES}


@pytest.fixture(scope="session")
def hf_dataset(hf_models, tmp_path_factory, corpus_files):
    """The test corpus tokenized with the Hugging Face models' tokenizer (every family here shares it)."""
    from zili.data.prepare import prepare

    out = tmp_path_factory.mktemp("hf-data") / "data"
    prepare(corpus_files, hf_models["qwen2"], out)
    return out
