"""`--model.init=hf:DIR`: continue training Hugging Face weights, then export what transformers loads as is."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.interop.conftest import transformers
from zili.config import load_config
from zili.infer.generate import generate
from zili.infer.run import load_run
from zili.train.trainer import Trainer

TRAINING = ["--training.seq_len=32", "--training.batch_size=4", "--training.dtype=fp32", "--metrics.progress=false",
            "--training.sample_tokens=0", "--metrics.log_every=5", "--training.eval_every=10"]


def test_training_starts_from_the_hf_weights(hf_models, hf_dataset, tmp_path):
    cfg = load_config(None, [("model.init", f"hf:{hf_models['qwen2']}"), ("data.dataset", str(hf_dataset)),
                             ("training.run_dir", str(tmp_path / "run")), ("training.dtype", "fp32")])
    trainer = Trainer(cfg)
    source = load_file(hf_models["qwen2"] / "model.safetensors")
    model = trainer.model.parts[0]
    assert model.args.qkv_bias and model.args.tied_embeddings
    assert torch.equal(model.embed.weight, source["model.embed_tokens.weight"])
    assert torch.equal(model.blocks["1"].attn.k_proj.bias, source["model.layers.1.self_attn.k_proj.bias"])


def test_train_20_steps_then_export_loads_in_transformers(hf_models, hf_dataset, tmp_path, zili_cli):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = zili_cli("train", f"--model.init=hf:{hf_models['qwen2']}", f"--data.dataset={hf_dataset}",
                    "--training.steps=20", f"--training.run_dir={run_dir}", *TRAINING)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert zili_cli("export-hf", run_dir, out).returncode == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    hf.eval()
    model, tokenizer = load_run(run_dir, device="cpu")
    trained = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(trained, load_file(hf_models["qwen2"] / "model.safetensors")["model.embed_tokens.weight"])
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max().item() <= 1e-5
    prompt = tokenizer.encode("import textwrap")
    ours = generate(model, prompt, 12, temperature=0.0, eos_id=None)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
    assert ours == theirs
    text = "def fill(text, width=70):  # wrap ü"
    assert (transformers.AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False)
            == tokenizer.encode(text))


def test_dataset_with_another_tokenizer_is_one_line(hf_models, tiny_dataset, tmp_path, zili_cli):
    proc = zili_cli("train", f"--model.init=hf:{hf_models['qwen2']}", f"--data.dataset={tiny_dataset}", *TRAINING,
                    f"--training.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "was not tokenized with" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
