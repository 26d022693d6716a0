"""Whole conversations packed into rows: the layout of a chat dataset (`kind = "chat"`) for fine-tuning.

A chat dataset stores, next to each token shard, a flags file of one byte per token (`flags-NNNNN.bin`):
`TRAIN` (bit 0) marks a token the model is trained to produce — the loss counts the prediction of that token —
and `START` (bit 1) the first token of a conversation. Conversations never straddle shards.

Rows. For a sequence length s a row holds up to s + 1 tokens (inputs are its first s, targets its last s).
Conversations are packed into rows in file order, greedily: a conversation goes into the current row if it
fits whole, else it starts the next row; one longer than s + 1 tokens is cut to its first s + 1 (counted in
`Rows.truncated`). The rest of a row is padding: a document of its own, never trained on. Rows depend only on
the dataset and s, so the loader's split and order work on rows as they do on plain packed sequences.

Tensors of a row (`row_tensors`): inputs (s,), targets (s,) with IGNORE where the target is not trained (a
prompt token, a conversation's first token — the prediction across a boundary — or padding), and document ids
(s,) of the inputs, for the model's `documents=` (zili.models.positions): positions restart with each
conversation and attention stays inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN = 1
START = 2
IGNORE = -100  # targets the loss leaves out (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Rows:
    """Packed rows: (shard, offset, length) of each row's tokens in its shard (int64 (n, 3)), and how many
    conversations were cut to fit a row."""

    spans: np.ndarray
    truncated: int


def pack_rows(shard_flags: list[np.ndarray], capacity: int) -> Rows:
    """The rows of up to `capacity` tokens that whole conversations fill, shard by shard, in order (see the
    module doc). `shard_flags` are the flags of each shard; a shard's first token must start a conversation."""
    spans, truncated = [], 0
    for shard, flags in enumerate(shard_flags):
        if not flags.size:
            continue
        starts = np.flatnonzero(np.asarray(flags) & START)
        if starts.size == 0 or starts[0] != 0:
            raise ValueError(f"shard {shard} does not begin with the start of a conversation")
        lengths = np.diff(np.append(starts, flags.size))
        row_start, row_length = 0, 0  # consecutive whole conversations: one contiguous span
        for start, length in zip(starts.tolist(), lengths.tolist()):
            if row_length and row_length + length > capacity:
                spans.append((shard, row_start, row_length))
                row_length = 0
            if length > capacity:  # a row of its own, cut
                spans.append((shard, start, capacity))
                truncated += 1
                continue
            if not row_length:
                row_start = start
            row_length += length
        if row_length:
            spans.append((shard, row_start, row_length))
    return Rows(np.array(spans, dtype=np.int64).reshape(-1, 3), truncated)


def row_tensors(tokens: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, documents), each int64 (n, s), of `n` rows given as `tokens` and `flags` (n, s + 1): a
    row's conversations, then padding whose first token is flagged START and the rest 0 (so padding is one more
    document, never trained on). See the module doc."""
    flags = np.asarray(flags)
    inputs = np.ascontiguousarray(tokens[:, :-1], dtype=np.int64)
    targets = np.array(tokens[:, 1:], dtype=np.int64)
    later = flags[:, 1:]
    targets[((later & TRAIN) == 0) | ((later & START) != 0)] = IGNORE
    documents = np.cumsum((flags[:, :-1] & START) != 0, axis=1).astype(np.int64)
    return inputs, targets, documents
