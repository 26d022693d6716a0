"""Chat fine-tuning end to end: `zili data prepare --format chat` (the mask and conversation starts it stores, the
template it keeps with the tokenizer), `zili train --training.objective=sft` from scratch and from a run
(`model.init=run:DIR`), and the one-line refusals of a wrong objective or a bad conversation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zili.config import load_config
from zili.data.arithmetic import write_task
from zili.data.loader import PackedDataset
from zili.data.packing import START, TRAIN
from zili.data.tokenizer import Tokenizer
from zili.infer.run import load_run
from zili.train.trainer import Trainer

SMALL = ["--model.preset=tiny", "--model.n_layers=2", "--model.dim=64", "--model.n_heads=2", "--model.n_kv_heads=1",
         "--model.ffn_dim=128", "--training.seq_len=128", "--training.batch_size=4", "--training.dtype=fp32",
         "--metrics.progress=false", "--training.sample_tokens=0", "--metrics.log_every=1", "--training.eval_every=4",
         "--data.val_fraction=0.05"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), seed=1, digits=2, n_sft=120, n_rl=10, n_heldout=10)


@pytest.fixture(scope="module")
def chat_data(task, tmp_path_factory):
    from zili.data.prepare import prepare

    out = tmp_path_factory.mktemp("chat") / "data"
    prepare([task / "sft.jsonl"], task / "tokenizer", out, format="chat")
    return out


def test_prepare_chat_stores_the_assistant_mask_and_conversation_starts(task, tmp_path, zili_cli):
    out = tmp_path / "data"
    proc = zili_cli("data", "prepare", "--format", "chat", "--input", task / "sft.jsonl", "--tokenizer",
                    task / "tokenizer", "--output", out)
    assert proc.returncode == 0, proc.stderr
    ds = PackedDataset(out)
    manifest = ds.manifest
    assert manifest["kind"] == "chat" and manifest["documents"] == 120
    tokens = np.fromfile(out / "shard-00000.bin", dtype="<u2")
    flags = np.fromfile(out / "flags-00000.bin", dtype=np.uint8)
    tokenizer = Tokenizer.load(out / "tokenizer")
    starts = np.flatnonzero(flags & START)
    assert starts.size == 120 and starts[0] == 0
    conversations = [json.loads(line)["messages"] for line in (task / "sft.jsonl").read_text().splitlines()]
    for k in (0, 57, 119):  # the trained tokens are the assistant's answer and its end-of-turn marker
        end = starts[k + 1] if k + 1 < starts.size else tokens.size
        trained = tokens[starts[k]: end][(flags[starts[k]: end] & TRAIN).astype(bool)]
        assert tokenizer.decode(trained.tolist()) == conversations[k][1]["content"] + "<|im_end|>"
    assert manifest["trained_tokens"] == int((flags & TRAIN).astype(bool).sum())
    assert (out / "tokenizer" / "chat_template.jinja").is_file()


def test_sft_trains_and_starts_from_a_run(chat_data, tmp_path, zili_cli):
    first = tmp_path / "first"
    proc = zili_cli("train", *SMALL, "--training.objective=sft", f"--data.dataset={chat_data}",
                    "--training.steps=8", f"--training.run_dir={first}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[1]["loss"] and records[-1]["val_loss"] < records[0]["val_loss"]
    # model.init=run: starts a new run (step 0) from the other's weights
    cfg = load_config(None, [("model.init", f"run:{first}"), ("training.objective", "sft"),
                             ("data.dataset", str(chat_data)), ("training.run_dir", str(tmp_path / "b")),
                             ("training.dtype", "fp32"), ("training.seq_len", "128"), ("training.batch_size", "4")])
    trainer = Trainer(cfg)
    source, _ = load_run(first, device="cpu")
    assert trainer.step == 0
    for (name, ours), theirs in zip(trainer.model.parts[0].state_dict().items(), source.state_dict().values()):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("objective, fragment", [("lm", "set training.objective=sft"),
                                                  ("grpo", "rl.prompts")])
def test_the_objective_must_fit_the_data(chat_data, tmp_path, zili_cli, objective, fragment):
    proc = zili_cli("train", *SMALL, f"--training.objective={objective}",
                    f"--data.dataset={chat_data}", "--training.steps=1",
                    f"--training.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sft_on_text_and_bad_conversations_are_one_line(task, tiny_dataset, tmp_path, zili_cli):
    proc = zili_cli("train", *SMALL, "--training.objective=sft", f"--data.dataset={tiny_dataset}",
                    "--training.steps=1", f"--training.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "needs a chat dataset" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                   + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    proc = zili_cli("data", "prepare", "--format", "chat", "--input", bad, "--tokenizer", task / "tokenizer",
                    "--output", tmp_path / "out")
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "'bot'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
