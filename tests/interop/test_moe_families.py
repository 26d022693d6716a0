"""Qwen3, Qwen3-MoE and DeepSeek-V3 (MLA, YaRN, group-limited sigmoid routing, shared experts, dense first
blocks) checkpoints built by transformers: import with equal logits, export what transformers loads with no
missing or unexpected keys and identical greedy tokens, and import -> export bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.interop.conftest import VOCAB, transformers
from zili.config import load_config
from zili.infer.generate import generate
from zili.infer.run import load_run
from zili.interop.export_hf import export_hf
from zili.interop.import_hf import import_hf
from zili.train.trainer import Trainer

NEW = ["qwen3", "qwen3_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory) -> dict:
    """Each new family imported once: kind -> run directory."""
    root = tmp_path_factory.mktemp("imported")
    return {kind: import_hf(hf_models[kind], root / kind) and root / kind for kind in NEW}


@pytest.mark.parametrize("kind", NEW)
def test_imported_logits_equal_transformers_at_200_positions(hf_models, imported, kind):
    model, _ = load_run(imported[kind], device="cpu")
    a = model.args
    if kind == "qwen3":
        assert a.qk_norm and a.head_dim == 32 and a.tied_embeddings and not a.is_moe
    elif kind == "qwen3_moe":
        assert a.qk_norm and a.n_routed_experts == 8 and a.score_func == "softmax" and not a.n_shared_experts
    else:
        assert a.is_mla and a.rope_scaling == "yarn" and a.n_group == 2 and a.n_dense_layers == 1
        bias = model.blocks["1"].mlp.gate.e_score_correction_bias
        assert bias.abs().sum() > 0  # the published balancing bias came along
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_models[kind], dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", NEW)
def test_import_then_export_is_bit_identical_in_the_hub_layout(hf_models, imported, tmp_path, kind):
    out = export_hf(imported[kind], tmp_path / "out")
    source, exported = load_file(hf_models[kind] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(source) == sorted(exported)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if kind != "qwen3":
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in exported  # one tensor per expert


@pytest.mark.parametrize("kind", NEW)
def test_export_loads_in_transformers_and_generates_the_same_tokens(imported, tmp_path, kind):
    out = export_hf(imported[kind], tmp_path / "out")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    hf.eval()
    model, tokenizer = load_run(imported[kind], device="cpu")
    prompt = tokenizer.encode("import textwrap")
    ours = generate(model, prompt, 12, temperature=0.0, eos_id=None)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
    assert ours == theirs


def test_bias_is_exported_in_fp32_with_bf16_weights(imported, tmp_path):
    out = export_hf(imported["deepseek_v3"], tmp_path / "out", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.experts.0.up_proj.weight").get_dtype() == "BF16"


@pytest.mark.parametrize("kind", NEW)
def test_training_starts_from_the_hf_weights_of_each_family(hf_models, hf_dataset, tmp_path, kind):
    settings = {"model.init": f"hf:{hf_models[kind]}", "data.dataset": str(hf_dataset),
                "training.run_dir": str(tmp_path / "run"), "training.dtype": "fp32", "training.steps": "8",
                "training.seq_len": "32", "training.batch_size": "4", "training.eval_every": "0",
                "training.sample_tokens": "0", "metrics.progress": "false", "metrics.log_every": "1",
                "optimizer.lr": "3e-3", "optimizer.warmup_steps": "2"}
    trainer = Trainer(load_config(None, list(settings.items())))
    model, source = trainer.model.parts[0], load_file(hf_models[kind] / "model.safetensors")
    assert torch.equal(model.embed.weight, source["model.embed_tokens.weight"])
    if kind == "deepseek_v3":
        assert torch.equal(model.blocks["2"].mlp.gate.e_score_correction_bias,
                           source["model.layers.2.mlp.gate.e_score_correction_bias"])
        assert torch.equal(model.blocks["1"].attn.kv_b_proj.weight, source["model.layers.1.self_attn.kv_b_proj.weight"])
    if kind != "qwen3":
        assert torch.equal(model.blocks["1"].mlp.experts.w_up[6], source["model.layers.1.mlp.experts.6.up_proj.weight"])
    else:
        assert torch.equal(model.blocks["1"].attn.k_norm.weight, source["model.layers.1.self_attn.k_norm.weight"])
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert losses[8] < losses[1]
    assert (tmp_path / "run" / "checkpoints" / "step-0000008").is_dir()
