"""Chat datasets packed for fine-tuning (zili.data.packing): whole conversations fill rows in order, the rows'
targets leave out what is not trained, and a packed batch gives each conversation the loss it has alone
(the same train-step loss as the conversation by itself, to float precision)."""

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from zili.data.loader import Loader, PackedDataset
from zili.data.packing import IGNORE, START, TRAIN, pack_rows, row_tensors
from zili.data.shards import file_sha256
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.parallel.apply import ParallelModel
from zili.train.step import forward_backward, lm_loss


def conversation(length: int, prompt: int) -> np.ndarray:
    """Flags of one conversation: `prompt` untrained tokens (the first one START), then trained ones."""
    flags = np.zeros(length, np.uint8)
    flags[0] = START
    flags[prompt:] = TRAIN
    return flags


def test_whole_conversations_fill_rows_in_order():
    shard0 = np.concatenate([conversation(n, 2) for n in (4, 3, 5, 9, 2)])
    shard1 = np.concatenate([conversation(n, 1) for n in (6, 6)])
    rows = pack_rows([shard0, shard1], capacity=8)
    # shard 0: [4+3] [5] [9 cut to 8] [2]; shard 1: [6] [6] — a row never spans shards
    assert rows.spans.tolist() == [[0, 0, 7], [0, 7, 5], [0, 12, 8], [0, 21, 2], [1, 0, 6], [1, 6, 6]]
    assert rows.truncated == 1
    with pytest.raises(ValueError, match="does not begin"):
        pack_rows([shard0[1:]], capacity=8)


def test_row_tensors_mask_prompts_boundaries_and_padding():
    tokens = np.array([[10, 11, 12, 20, 21, 0, 0]])
    flags = np.array([[START, 0, TRAIN, START, TRAIN, START, 0]], np.uint8)  # 2 conversations, then padding
    inputs, targets, documents = row_tensors(tokens, flags)
    assert inputs.tolist() == [[10, 11, 12, 20, 21, 0]]
    # predicting 12 and 21 is trained; 11 is prompt, 20 starts the next conversation, the rest is padding
    assert targets.tolist() == [[IGNORE, 12, IGNORE, 21, IGNORE, IGNORE]]
    assert documents.tolist() == [[1, 1, 1, 2, 2, 3]]


def write_chat_dataset(directory, conversations: list[tuple[list[int], int]], vocab_size: int = 64,
                       shard_size: int = 10_000):
    """A chat dataset on disk as `zili data prepare --format chat` lays it out: (tokens, prompt length) each."""
    directory.mkdir()
    tokens = np.concatenate([np.array(t, np.uint16) for t, _ in conversations])
    flags = np.concatenate([conversation(len(t), p) for t, p in conversations])
    (directory / "shard-00000.bin").write_bytes(tokens.astype("<u2").tobytes())
    (directory / "flags-00000.bin").write_bytes(flags.tobytes())
    (directory / "tokenizer").mkdir()
    manifest = {"format": 1, "kind": "chat", "dtype": "uint16", "vocab_size": vocab_size, "eos_id": 0,
                "total_tokens": int(tokens.size), "documents": len(conversations), "tokenizer": "tokenizer",
                "shards": [{"file": "shard-00000.bin", "tokens": int(tokens.size),
                            "sha256": file_sha256(directory / "shard-00000.bin"),
                            "flags": {"file": "flags-00000.bin",
                                      "sha256": file_sha256(directory / "flags-00000.bin")}}]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_loader_gives_packed_rows_with_documents_and_checks_the_flags(tmp_path):
    rng = np.random.default_rng(0)
    convs = [(rng.integers(1, 64, n).tolist(), 2) for n in (5, 4, 7, 3, 6, 8)]
    ds = PackedDataset(write_chat_dataset(tmp_path / "chat", convs))
    assert ds.kind == "chat" and ds.n_sequences(8) == len(ds.rows(8).spans)
    loader = Loader(ds, seq_len=8, batch_size=2, seed=1, val_fraction=0.0)
    inputs, targets, documents = loader.next_batch()
    assert inputs.shape == targets.shape == documents.shape == (2, 8)
    for row in range(2):  # each row: its documents' ids start at 1 and never decrease
        assert documents[row, 0] == 1 and bool((documents[row, 1:] >= documents[row, :-1]).all())
    ds.verify()
    (tmp_path / "chat" / "flags-00000.bin").write_bytes(b"\0" * (tmp_path / "chat" / "flags-00000.bin").stat().st_size)
    with pytest.raises(UserError, match="checksum"):
        ds.verify()


def test_a_packed_batch_gives_each_conversation_its_loss_alone():
    """The train step's loss over a packed row equals the token-weighted mean of each conversation's own loss."""
    torch.manual_seed(0)
    args = ModelArgs(n_layers=2, dim=48, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=32)
    model = Transformer(args)
    model.init_weights(1)
    wrapped = ParallelModel([model])
    convs = [(torch.randint(1, 64, (n,)), p) for n, p in ((6, 2), (9, 4), (5, 1))]
    tokens = np.concatenate([c.numpy() for c, _ in convs] + [np.zeros(2, np.int64)])  # 20 + 2 padding = 22
    flags = np.concatenate([conversation(len(c), p) for c, p in convs] + [np.array([START, 0], np.uint8)])
    inputs, targets, documents = (torch.from_numpy(a) for a in row_tensors(tokens[None], flags[None]))
    packed, _ = forward_backward(wrapped, inputs, targets, micro_batch=1, autocast=nullcontext, train=False,
                                 documents=documents)
    sums, counts = [], []
    for conv, prompt in convs:  # each alone: targets from its prompt on
        target = conv[1:].clone()
        target[: prompt - 1] = IGNORE
        with torch.no_grad():
            sums.append(lm_loss(model(conv[None, :-1]), target[None], reduction="sum"))
        counts.append(int((target != IGNORE).sum()))
    assert int((targets != IGNORE).sum()) == sum(counts)
    torch.testing.assert_close(packed, torch.stack(sums).sum() / sum(counts), rtol=1e-5, atol=1e-6)
    # without the documents the later conversations see the earlier ones: another loss
    plain, _ = forward_backward(wrapped, inputs, targets, micro_batch=1, autocast=nullcontext, train=False)
    assert abs(float(plain) - float(packed)) > 1e-3
