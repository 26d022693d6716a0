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


def build_hf(kind: str, out: Path, **save_kwargs) -> Path:
    """A Qwen2 (tied embeddings, q/k/v bias, GQA) or a Llama (untied, Llama 3 rope scaling, GQA 4:1) with
    random weights, saved with its tokenizer into `out`."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if kind == "qwen2":
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


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: build_hf(kind, root / kind) for kind in ("qwen2", "llama")}
