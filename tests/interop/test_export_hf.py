"""`zili export-hf`: what zili writes, transformers loads as it is — same logits, same greedy tokens, same
tokenizer ids — and an imported model comes back bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_MODEL
from tests.interop.conftest import transformers
from zili.infer.generate import generate
from zili.infer.run import load_run
from zili.interop.export_hf import export_hf
from zili.interop.import_hf import import_hf


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_import_then_export_is_bit_identical(hf_models, tmp_path, kind):
    import_hf(hf_models[kind], tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "out")
    source, exported = load_file(hf_models[kind] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(source) == sorted(exported)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((hf_models[kind] / "config.json").read_text())["architectures"]
    # the classic config form it writes gives transformers the same model (rope scaling included)
    tokens = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = [transformers.AutoModelForCausalLM.from_pretrained(d).eval()(input_ids=tokens).logits
                  for d in (hf_models[kind], out)]
    assert torch.equal(logits[0], logits[1])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset, peak_flops):
    """A tiny zili model trained from scratch for 5 steps (fp32, untied head), with its checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import seed_peak_flops

    root = tmp_path_factory.mktemp("trained")
    seed_peak_flops(root / "cache")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "ZILI_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "zili", "train", *TINY_MODEL, f"--data.dataset={tiny_dataset}",
                    "--training.steps=5", "--model.tied_embeddings=false", f"--training.run_dir={root / 'run'}"],
                   env=env, check=True, capture_output=True, timeout=300)
    return root / "run"


def test_trained_model_loads_in_transformers_unchanged(trained_run, tmp_path, zili_cli):
    proc = zili_cli("export-hf", trained_run, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    model, tokenizer = load_run(trained_run, device="cpu")
    tokens = torch.randint(0, model.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max().item() <= 1e-5
    prompt = tokenizer.encode("def wrap(text, width):")
    ours = generate(model, prompt, 12, temperature=0.0, top_p=1.0, seed=0, eos_id=None)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
    assert ours == theirs
    text = "Hello, world!  Tabs\tand ünïcode — wrapped text."
    assert (transformers.AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False)
            == tokenizer.encode(text))


def test_sharded_export_loads(trained_run, tmp_path):
    out = export_hf(trained_run, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    for f in files:  # a shard holds whole tensors: over the limit only when one tensor alone is larger
        names = [n for n, file in index["weight_map"].items() if file == f]
        assert len(names) == 1 or (out / f).stat().st_size <= 60_000 + 4_096, (f, names)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_export_without_checkpoint_is_one_line(tmp_path, zili_cli):
    (tmp_path / "empty").mkdir()
    proc = zili_cli("export-hf", tmp_path / "empty", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no complete checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1
