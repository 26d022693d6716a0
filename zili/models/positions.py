"""Token positions given explicitly, as spans, and causal attention decided by position instead of by column.

An input of T columns normally holds the positions start_pos .. start_pos + T - 1 of its sequences. `positions`,
a tuple of `range`s in column order (`Spans`, each of step 1), says otherwise: (range(0, 8), range(24, 32)) is an
input of 16 columns holding positions 0-7 and then 24-31 of a longer sequence. RoPE rotates each column by its own
position (`rope_rows`), and causal attention lets the query at position p see the keys at positions <= p
(`causal_attention`).

Packed documents are the other kind of explicit positions: `Documents` (from `document_positions(doc_ids)`) holds, for
each row of the batch, the position of each column within its own document — positions restart at 0 where a
document starts — and the attention mask that keeps documents apart (a query sees the earlier keys of its own
document only). Packing several short conversations into one row then gives each the logits it has alone.

The keys need not be the input's own. An attention module passes its per-token key material (grouped-query:
rotated keys and values; latent attention: the normalised latent and the rotated shared key) through its
`key_context`, a `KeyContext` module that returns the spans its keys cover and the key material — by default
the input's own, unchanged. Whatever can supply the keys of other positions (a memory of earlier segments, or
zili.parallel.context_parallel's gather over ranks) takes that module's place; the model does not know which.
Every key tensor has the sequence in dimension -2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zili import kernels

Spans = tuple[range, ...]


@dataclass(frozen=True)
class Documents:
    """Rows of packed documents: `positions` (B, T) int64, each column's position within its document;
    `mask` (B, 1, T, T) bool, True where a query (row 2) may see a key (column 3): same document, not later;
    `end`, the largest position + 1 (what the RoPE table must cover)."""

    positions: torch.Tensor
    mask: torch.Tensor
    end: int


def document_positions(doc_ids: torch.Tensor) -> Documents:
    """The `Documents` of (B, T) integer document ids, one per column, each row's documents in contiguous
    runs of columns (a change of id starts a document). ValueError unless (B, T)."""
    if doc_ids.dim() != 2:
        raise ValueError(f"document ids must be (batch, columns), got shape {tuple(doc_ids.shape)}")
    T = doc_ids.shape[1]
    column = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # each column's document start: the latest start at or before it
    first = torch.where(starts, column, torch.zeros_like(column)).cummax(dim=1).values
    positions = column - first
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril_()
    return Documents(positions, (same & causal)[:, None], int(positions.max()) + 1 if T else 0)


def check_spans(spans: Spans, columns: int) -> int:
    """The position after the last one in `spans` (what the RoPE table must cover); ValueError unless `spans`
    are ranges of step 1 that hold `columns` positions in all."""
    if not spans or any(not isinstance(s, range) or s.step != 1 or len(s) == 0 for s in spans):
        raise ValueError(f"positions must be non-empty ranges of step 1, got {spans!r}")
    if sum(len(s) for s in spans) != columns:
        raise ValueError(f"positions {spans!r} hold {sum(len(s) for s in spans)} positions for {columns} columns")
    return max(s.stop for s in spans)


def position_tensor(spans: Spans, device=None) -> torch.Tensor:
    """The positions of `spans`, one per column: int64 (T,)."""
    return torch.cat([torch.arange(s.start, s.stop, device=device) for s in spans])


def rope_rows(rope: torch.Tensor, spans: Spans | Documents) -> torch.Tensor:
    """(2, T, rope_dim): the rows of the (2, max_seq_len, rope_dim) cos/sin table at the positions of `spans`
    (a view, no copy, for one span); for `Documents`, (2, B, 1, T, rope_dim), each row's own positions."""
    if isinstance(spans, Documents):
        return rope[:, spans.positions][:, :, None]
    rows = [rope[:, s.start : s.stop] for s in spans]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


class KeyContext(nn.Module):
    """The keys attention sees: `forward(spans, *key_tensors) -> (key_spans, *key_tensors)`, here the input's own.
    No parameters, so replacing it changes no parameter name."""

    def forward(self, spans: Spans, *tensors: torch.Tensor):
        return (spans, *tensors)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_spans: Spans | Documents,
                     k_spans: Spans | Documents, scale: float | None = None) -> torch.Tensor:
    """Attention output (B, H, T, dv) of queries q (B, H, T, d) at positions `q_spans` over keys k (B, KV, S, d)
    and values v (B, KV, S, dv) at positions `k_spans`, each query seeing the keys at positions up to its own
    (for `Documents`, the queries' own columns as keys: those of its document up to its own).

    When the keys are positions 0 .. S-1 in order, each query span is one causal call against the keys up to its
    end (`kernels.attention`, bottom-right aligned), so the device's causal kernel runs and skips what is masked —
    for one span from 0, exactly the plain causal call. Otherwise one call with a (T, S) mask by position."""
    if isinstance(q_spans, Documents):
        return kernels.attention(q, k, v, q_spans.mask, causal=False, scale=scale)
    S = k.shape[2]
    if len(k_spans) == 1 and k_spans[0].start == 0 and max(s.stop for s in q_spans) <= S:
        outs, column = [], 0
        for span in q_spans:
            part = q[:, :, column : column + len(span)]
            outs.append(kernels.attention(part, k[:, :, : span.stop], v[:, :, : span.stop], scale=scale))
            column += len(span)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    mask = position_tensor(k_spans, q.device)[None, :] <= position_tensor(q_spans, q.device)[:, None]
    return kernels.attention(q, k, v, mask, causal=False, scale=scale)
