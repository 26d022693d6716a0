"""Token positions given explicitly, as spans, and causal attention decided by position instead of by column.

An input of T columns normally holds the positions start_pos .. start_pos + T - 1 of its sequences. `positions`,
a tuple of `range`s in column order (`Spans`, each of step 1), says otherwise: (range(0, 8), range(24, 32)) is an
input of 16 columns holding positions 0-7 and then 24-31 of a longer sequence. RoPE rotates each column by its own
position (`rope_rows`), and causal attention lets the query at position p see the keys at positions <= p
(`causal_attention`).

The keys need not be the input's own. An attention module passes its per-token key material (grouped-query:
rotated keys and values; latent attention: the normalised latent and the rotated shared key) through its
`key_context`, a `KeyContext` module that returns the spans its keys cover and the key material — by default
the input's own, unchanged. Whatever can supply the keys of other positions (a memory of earlier segments, or
zili.parallel.context_parallel's gather over ranks) takes that module's place; the model does not know which.
Every key tensor has the sequence in dimension -2.
"""

from __future__ import annotations

import torch
from torch import nn

from zili import kernels

Spans = tuple[range, ...]


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


def rope_rows(rope: torch.Tensor, spans: Spans) -> torch.Tensor:
    """(2, T, rope_dim): the rows of the (2, max_seq_len, rope_dim) cos/sin table at the positions of `spans`
    (a view, no copy, for one span)."""
    rows = [rope[:, s.start : s.stop] for s in spans]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


class KeyContext(nn.Module):
    """The keys attention sees: `forward(spans, *key_tensors) -> (key_spans, *key_tensors)`, here the input's own.
    No parameters, so replacing it changes no parameter name."""

    def forward(self, spans: Spans, *tensors: torch.Tensor):
        return (spans, *tensors)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_spans: Spans, k_spans: Spans,
                     scale: float | None = None) -> torch.Tensor:
    """Attention output (B, H, T, dv) of queries q (B, H, T, d) at positions `q_spans` over keys k (B, KV, S, d)
    and values v (B, KV, S, dv) at positions `k_spans`, each query seeing the keys at positions up to its own.

    When the keys are positions 0 .. S-1 in order, each query span is one causal call against the keys up to its
    end (`kernels.attention`, bottom-right aligned), so the device's causal kernel runs and skips what is masked —
    for one span from 0, exactly the plain causal call. Otherwise one call with a (T, S) mask by position."""
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
