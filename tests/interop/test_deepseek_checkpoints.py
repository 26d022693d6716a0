"""DeepSeek-V3 checkpoints as published: block-quantized FP8 weights dequantized region by region on import, the
multi-token-prediction layer skipped in one info line, and an expert count that differs from config.json
refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zili.errors import UserError
from zili.infer.run import load_run
from zili.interop.export_hf import export_hf
from zili.interop.hf import args_from_config, read_config
from zili.interop.import_hf import HFWeights, import_hf
from zili.models.transformer import Transformer

BLOCK = (16, 16)  # small blocks so that the tiny model's weights span several, some of them partial
KEEP = ("embed_tokens", "lm_head", "norm", "mlp.gate.")  # what DeepSeek leaves unquantized


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's format: float8_e4m3fn weights, and per BLOCK a float32 scale with weight = fp8 x scale."""
    rows, cols = -(-weight.shape[0] // BLOCK[0]), -(-weight.shape[1] // BLOCK[1])
    scale = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            block = weight[r * BLOCK[0]:(r + 1) * BLOCK[0], c * BLOCK[1]:(c + 1) * BLOCK[1]]
            scale[r, c] = block.abs().max().clamp(min=1e-12) / 448.0
    expanded = scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:weight.shape[0], :weight.shape[1]]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def dequantized(fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: each element times its block's scale, in fp32."""
    rows = torch.arange(fp8.shape[0]) // BLOCK[0]
    cols = torch.arange(fp8.shape[1]) // BLOCK[1]
    return fp8.float() * scale[rows][:, cols]


@pytest.fixture(scope="module")
def fp8_checkpoint(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "deepseek"
    shutil.copytree(hf_models["deepseek_v3"], out)
    tensors = load_file(out / "model.safetensors")
    quantized = {}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(k in name for k in KEEP):
            quantized[name], quantized[name + "_scale_inv"] = quantize(t)
        else:
            quantized[name] = t
    save_file(quantized, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_fp8_block_quantized_weights_import_dequantized(fp8_checkpoint, tmp_path):
    import_hf(fp8_checkpoint, tmp_path / "run")
    model, _ = load_run(tmp_path / "run", device="cpu")
    source = load_file(fp8_checkpoint / "model.safetensors")
    kv_a = source["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape[0] % BLOCK[0]  # a partial block of rows
    assert torch.equal(model.blocks["0"].attn.kv_a_proj_with_mqa.weight,
                       dequantized(kv_a, source["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]))
    expert = dequantized(source["model.layers.2.mlp.experts.5.down_proj.weight"],
                         source["model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"])
    assert torch.equal(model.blocks["2"].mlp.experts.w_down[5], expert)
    assert torch.equal(model.embed.weight, source["model.embed_tokens.weight"])  # left as it was
    meta = json.loads(next((tmp_path / "run" / "checkpoints").iterdir()).joinpath("meta.json").read_text())
    assert meta["hf"]["dtype"] == "bfloat16"  # what export writes back: zili does not re-quantize


def test_fp8_regions_are_read_and_dequantized_alone(fp8_checkpoint):
    with torch.device("meta"):
        model = Transformer(args_from_config(read_config(fp8_checkpoint))[0])
    weights = HFWeights(fp8_checkpoint, model)
    name, shape = "blocks.1.attn.q_b_proj.weight", (96, 32)
    full = weights(name, shape)
    read_before = weights.bytes_read
    region = weights(name, shape, offsets=(10, 5), sizes=(30, 20))  # across block edges in both dimensions
    assert torch.equal(region, full[10:40, 5:25])
    scale_bytes = 6 * 2 * 4  # the (96/16) x (32/16) float32 scales
    assert weights.bytes_read - read_before == 30 * 20 + scale_bytes  # one byte per fp8 weight of the region
    experts = weights("blocks.2.mlp.experts.w_gate", (8, 32, 64), offsets=(3, 0, 0), sizes=(2, 32, 64))
    assert torch.equal(experts, weights("blocks.2.mlp.experts.w_gate", (8, 32, 64))[3:5])


def test_multi_token_prediction_layer_is_skipped_with_one_info_line(hf_models, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models["deepseek_v3"], hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)  # DeepSeek keeps MTP after the last block
    tensors["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    import_hf(hf_dir, tmp_path / "run")
    info = [line for line in capsys.readouterr().err.splitlines() if "multi-token-prediction" in line]
    assert len(info) == 1 and "model.layers.3." in info[0] and "2 tensors" in info[0]
    config["num_nextn_predict_layers"] = 0  # then the same tensors do not belong
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.3."):
        import_hf(hf_dir, tmp_path / "run2")


def with_mtp_layer(source: Path, out: Path) -> Path:
    """The tiny DeepSeek-V3 plus a multi-token-prediction layer 3 as DeepSeek publishes it: an expert block (here a
    copy of block 2's tensors, perturbed), enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding
    and the head."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("layers.2.", "layers.3.")] = tensors[name] + 0.01 * torch.randn(tensors[name].shape,
                                                                                              generator=g)
    tensors.update({"model.layers.3.enorm.weight": 1 + 0.1 * torch.randn(64, generator=g),
                    "model.layers.3.hnorm.weight": 1 + 0.1 * torch.randn(64, generator=g),
                    "model.layers.3.shared_head.norm.weight": 1 + 0.1 * torch.randn(64, generator=g),
                    "model.layers.3.eh_proj.weight": 0.05 * torch.randn(64, 128, generator=g),
                    "model.layers.3.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                    "model.layers.3.shared_head.head.weight": tensors["lm_head.weight"].clone()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_mtp_layer_loads_when_asked_and_exports_back_bit_identical(hf_models, tmp_path):
    hf_dir = with_mtp_layer(hf_models["deepseek_v3"], tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "run", mtp_depth=1)
    model, _ = load_run(tmp_path / "run", device="cpu")
    source = load_file(hf_dir / "model.safetensors")
    assert torch.equal(model.mtp["0"].eh_proj.weight, source["model.layers.3.eh_proj.weight"])
    assert torch.equal(model.mtp["0"].block.mlp.experts.w_down[4],
                       source["model.layers.3.mlp.experts.4.down_proj.weight"])
    assert torch.equal(model.mtp["0"].norm.weight, source["model.layers.3.shared_head.norm.weight"])
    out = export_hf(tmp_path / "run", tmp_path / "out")
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[name], tensor) for name, tensor in source.items())
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_expert_count_differing_from_config_is_one_line_exit_2(hf_models, tmp_path, zili_cli):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models["qwen3_moe"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_local_experts"] = 6  # the checkpoint holds 8
    (hf_dir / "config.json").write_text(json.dumps(config))
    proc = zili_cli("import-hf", hf_dir, tmp_path / "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds expert 6 in layer 0 but its config.json has 6 routed experts" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
