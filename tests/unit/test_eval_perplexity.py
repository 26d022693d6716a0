"""`zili eval MODEL --data`: on a prepared dataset the loss is the trainer's validation loss on the same batches
(plain text, and conversations of a chat dataset); on a text file it is the hand-computed mean cross-entropy
over windows, with perplexity and bits per byte derived from it; bad inputs are one line and exit code 2."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODEL, seed_peak_flops
from zili.cli import main
from zili.config import load_config, parse_overrides
from zili.data.packing import START, TRAIN
from zili.data.shards import file_sha256
from zili.data.tokenizer import Tokenizer
from zili.eval.perplexity import evaluate_data
from zili.infer.run import load_run
from zili.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory, peak_flops):
    """(run directory after one step of the tiny model, that trainer's validation loss: 2 batches of 4)."""
    root = tmp_path_factory.mktemp("eval-run")
    seed_peak_flops(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZILI_CACHE", str(root / "cache"))
        trainer = Trainer(load_config(None, parse_overrides([
            *TINY_MODEL, f"--data.dataset={tiny_dataset}", f"--training.run_dir={root / 'run'}", "--training.steps=1",
            "--training.eval_every=0", "--training.eval_batches=2"])))
        trainer.run()
        return root / "run", trainer.validate()


def test_dataset_loss_is_the_trainers_validation_loss(trained, tiny_dataset):
    run, val_loss = trained
    # seq_len 32 and val_fraction 0.01 come from the run's config.toml
    result = evaluate_data(run, tiny_dataset, batch_size=4, max_batches=2)
    assert (result.split, result.seq_len, result.sequences, result.tokens) == ("validation", 32, 8, 8 * 32)
    assert result.loss == pytest.approx(val_loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / result.bytes)
    assert 1 < result.bytes / result.tokens < 8  # a 512-token BPE on Python source: a few bytes per token
    whole = evaluate_data(run, tiny_dataset, batch_size=5)  # every validation sequence once, the last batch short
    assert whole.sequences > 8 and whole.tokens == whole.sequences * 32


def write_chat_dataset(directory, tokenizer_dir, n_conversations: int = 120, seed: int = 0):
    """A chat dataset laid out as `zili data prepare` writes one: random conversations of the tokenizer's ids, each
    a prompt (untrained) then an answer (trained)."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    rng = np.random.default_rng(seed)
    tokens, flags = [], []
    for _ in range(n_conversations):
        prompt, answer = int(rng.integers(3, 9)), int(rng.integers(2, 12))
        tokens.append(rng.integers(1, tokenizer.vocab_size, prompt + answer))
        flag = np.zeros(prompt + answer, np.uint8)
        flag[0], flag[prompt:] = START, TRAIN
        flags.append(flag)
    directory.mkdir()
    shutil.copytree(tokenizer_dir, directory / "tokenizer")
    (directory / "shard-00000.bin").write_bytes(np.concatenate(tokens).astype("<u2").tobytes())
    (directory / "flags-00000.bin").write_bytes(np.concatenate(flags).tobytes())
    total = sum(t.size for t in tokens)
    manifest = {"format": 1, "kind": "chat", "dtype": "uint16", "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id, "total_tokens": total, "documents": n_conversations,
                "tokenizer": "tokenizer",
                "shards": [{"file": "shard-00000.bin", "tokens": total,
                            "sha256": file_sha256(directory / "shard-00000.bin"),
                            "flags": {"file": "flags-00000.bin",
                                      "sha256": file_sha256(directory / "flags-00000.bin")}}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_chat_dataset_loss_counts_answers_only_as_sft_validation_does(trained, tmp_path):
    run, _ = trained
    chat = write_chat_dataset(tmp_path / "chat", run / "tokenizer")
    # the trainer's figure on one batch of 4 rows is the mean over that batch's trained targets
    sft = Trainer(load_config(None, parse_overrides([
        f"--model.init=run:{run}", f"--data.dataset={chat}", "--data.val_fraction=0.1", "--training.objective=sft",
        "--training.seq_len=32", "--training.batch_size=4", "--training.eval_batches=1", "--training.dtype=fp32",
        f"--training.run_dir={tmp_path / 'sft'}", "--metrics.progress=false"])))
    result = evaluate_data(run, chat, batch_size=4, max_batches=1, val_fraction=0.1)
    assert result.sequences == 4 and 0 < result.tokens < 4 * 32  # prompts, boundaries and padding do not count
    assert result.loss == pytest.approx(sft.validate(), rel=1e-5)


def test_text_file_loss_is_the_mean_cross_entropy_over_windows(trained, tmp_path, corpus_files):
    run, _ = trained
    text = corpus_files[0].read_text()[:1500] + "\nnaïve café — ünïcode\n"
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate_data(run, path, seq_len=32, batch_size=3)

    model, tokenizer = load_run(run)
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    assert tokenizer.decode(ids[1:]) == text  # byte-level BPE: the targets spell the file exactly
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):  # windows of 33 tokens sharing one: each token predicted once
            window = torch.tensor(ids[start : start + 33])
            logits = model(window[None, :-1])[0]
            nats += float(F.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    assert (result.split, result.tokens, result.bytes) == ("text", count, len(text.encode("utf-8")))
    assert result.sequences == math.ceil((len(ids) - 1) / 32)
    assert result.loss == pytest.approx(nats / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    first = evaluate_data(run, path, seq_len=32, batch_size=3, max_batches=1)
    assert (first.sequences, first.tokens) == (3, 3 * 32)


def test_cli_prints_a_table_and_writes_json(trained, tmp_path, capsys):
    run, _ = trained
    path = tmp_path / "t.txt"
    path.write_text("def wrap(text, width=70):\n    return text.split()\n" * 20)
    main(["eval", str(run), "--data", str(path), "--seq-len", "16", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["split"] == "text" and saved["seq_len"] == 16
    assert saved["perplexity"] == pytest.approx(math.exp(saved["loss"]))
    assert f"{saved['loss']:.4f} nats/token" in out and "bits per byte" in out
    assert not list(tmp_path.glob(".tmp-*"))  # written through a temporary file, renamed


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_bad_inputs_are_one_line(trained, tiny_dataset, corpus_files, tmp_path, capsys):
    from zili.data.prepare import prepare
    from zili.data.tokenizer import train_bpe

    run, _ = trained
    assert "not found" in one_line_error(capsys, ["eval", str(tmp_path / "nope"), "--data", str(tiny_dataset)])
    assert "not found" in one_line_error(capsys, ["eval", str(run), "--data", str(tmp_path / "nope")])
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in one_line_error(capsys, ["eval", str(run), "--data", str(tmp_path / "empty.txt")])
    assert "max_seq_len" in one_line_error(capsys, ["eval", str(run), "--data", str(tiny_dataset),
                                                    "--seq-len", "1000000"])
    err = one_line_error(capsys, ["eval", str(run), "--data", str(tiny_dataset), "--limit", "3"])
    assert "--limit goes with --tasks, not --data" in err
    big = train_bpe([corpus_files[1].read_text()], 1024)  # another tokenizer, larger than the model's vocabulary
    big.save(tmp_path / "big-tok")
    (tmp_path / "small.txt").write_text(corpus_files[1].read_text()[:20000])
    prepare([tmp_path / "small.txt"], tmp_path / "big-tok", tmp_path / "big-data")
    assert "vocabulary" in one_line_error(capsys, ["eval", str(run), "--data", str(tmp_path / "big-data")])
    small = train_bpe([corpus_files[1].read_text()], 300)  # another tokenizer that fits but is not the model's
    small.save(tmp_path / "small-tok")
    prepare([tmp_path / "small.txt"], tmp_path / "small-tok", tmp_path / "small-data")
    assert "another tokenizer" in one_line_error(capsys, ["eval", str(run), "--data", str(tmp_path / "small-data")])


def test_tasks_without_lm_eval_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    err = one_line_error(capsys, ["eval", str(tmp_path), "--tasks", "hellaswag"])
    assert "pip install 'zili[eval]'" in err
