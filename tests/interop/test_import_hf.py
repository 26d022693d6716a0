"""`zili import-hf`: Qwen2 and Llama checkpoints built by transformers load into zili with equal logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.interop.conftest import VOCAB, build_hf, transformers
from zili.cli import main
from zili.errors import UserError
from zili.infer.run import load_run
from zili.interop.hf import args_from_config, hf_name, read_config, zili_name
from zili.interop.import_hf import import_hf


def logits_gap(run_dir, hf_dir, length: int = 200) -> float:
    model, _ = load_run(run_dir, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(tokens) - hf(input_ids=tokens).logits).abs().max().item()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_imported_logits_equal_transformers(hf_models, tmp_path, kind):
    run_dir = tmp_path / "run"
    import_hf(hf_models[kind], run_dir)
    model, tokenizer = load_run(run_dir, device="cpu")
    a = model.args
    if kind == "qwen2":
        assert a.tied_embeddings and a.qkv_bias and a.n_kv_heads == 2 and a.rope_scaling == "none"
    else:
        assert not a.tied_embeddings and not a.qkv_bias and a.n_kv_heads == 1 and a.rope_scaling == "llama3"
    # 200 positions: past the Llama's original_max_position_embeddings (64), where its scaling matters
    assert logits_gap(run_dir, hf_models[kind]) <= 1e-5
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file() and tokenizer.vocab_size == 300


def test_classic_and_rope_parameters_config_forms_agree(hf_models, tmp_path):
    config = read_config(hf_models["llama"])
    assert "rope_parameters" in config  # what transformers 5 writes
    params = config.pop("rope_parameters")
    classic = {**config, "rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    assert args_from_config(classic) == args_from_config(read_config(hf_models["llama"]))
    assert args_from_config(classic)[0].rope_theta == 500000.0


def test_sharded_checkpoint_imports(tmp_path):
    hf_dir = build_hf("llama", tmp_path / "hf", max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    import_hf(hf_dir, tmp_path / "run")
    assert logits_gap(tmp_path / "run", hf_dir, length=40) <= 1e-5


def test_name_map_round_trips(hf_models):
    from safetensors import safe_open

    with safe_open(str(hf_models["llama"] / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert all(hf_name(zili_name(n)) == n for n in names)


def _break(hf_dir, tmp_path, how):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    if how == "no-config":
        (broken / "config.json").unlink()
    elif how == "missing-tensor":
        tensors = load_file(broken / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    elif how == "shape":
        config = json.loads((broken / "config.json").read_text())
        config["intermediate_size"] = 128
        (broken / "config.json").write_text(json.dumps(config))
    elif how == "model-type":
        config = json.loads((broken / "config.json").read_text())
        config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize("how,message", [
    ("no-config", "config.json not found"),
    ("missing-tensor", "'model.layers.1.mlp.up_proj.weight' is missing"),
    ("shape", "has shape (96, 64) but config.json implies (128, 64)"),
    ("model-type", "unsupported architecture GPT2LMHeadModel — zili imports Qwen2ForCausalLM, LlamaForCausalLM"),
])
def test_bad_input_is_one_line_exit_2(hf_models, tmp_path, zili_cli, capsys, how, message):
    broken = _break(hf_models["llama"], tmp_path, how)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_hf(broken, tmp_path / "run-api")
    if how == "missing-tensor":  # one case through `python -m zili` as a user runs it
        proc = zili_cli("import-hf", broken, tmp_path / "run")
        code, err = proc.returncode, proc.stderr
    else:  # the others through the same zili.cli.main in this process (a subprocess costs seconds here)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["import-hf", str(broken), str(tmp_path / "run")])
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err and message in lines[0]
    assert not (tmp_path / "run").exists()
