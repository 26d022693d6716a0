"""Packed sequences from a prepared dataset, and the rank-sharded, shuffled, resumable batch loader.

Packing (per shard, so no sequence straddles two files): a shard of n tokens holds `(n - 1) // seq_len`
sequences; sequence j of a shard is tokens `[j*seq_len, j*seq_len + seq_len + 1)`, i.e. inputs are its
first `seq_len` tokens and targets its last `seq_len` (consecutive windows share one token). Global
sequence ids run over the shards in manifest order. Documents are concatenated with EOS between them, so
a sequence may span several documents (plain packing, no cross-document attention mask).

A chat dataset (zili.data.packing) is packed differently: whole conversations fill rows of up to
`seq_len + 1` tokens, padded, and each batch also carries document ids and targets with the untrained ones
left out (IGNORE). Its sequence ids are row ids; split and order below are the same.

Split: the validation ids are `n_val` ids spread evenly over `[0, n_sequences)`; they depend only on the
dataset, `seq_len` and `val_fraction` (never on the seed or the world size). The rest are train ids.

Order: epoch e visits every train id once, in a permutation drawn from PCG64 seeded with
SeedSequence([seed, e]) (argsort of raw 64-bit draws, which is stable across numpy versions and
machines). The loader's only state is `position`, the number of train sequences consumed globally; the
global batch is order[position : position + batch_size] (crossing into the next epoch seamlessly) and rank
r takes the r-th contiguous slice of `batch_size // world_size` sequences. So resuming from `position`
gives the same global batches under any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from zili.data.manifest import REPREPARE, read_manifest
from zili.data.packing import START, Rows, pack_rows, row_tensors
from zili.data.shards import file_sha256
from zili.errors import UserError


class PackedDataset:
    """A prepared dataset directory, its shards memory-mapped read-only, cut into packed sequences."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shard_tokens = np.array([s["tokens"] for s in self.manifest["shards"]], dtype=np.int64)
        self._shards = [
            np.memmap(self.directory / s["file"], dtype=dtype, mode="r") if s["tokens"] else np.empty(0, dtype)
            for s in self.manifest["shards"]
        ]
        self._starts: dict[int, np.ndarray] = {}
        self.kind = self.manifest["kind"]
        self._flags = [np.memmap(self.directory / s["flags"]["file"], dtype=np.uint8, mode="r")
                       if s["tokens"] else np.empty(0, np.uint8)
                       for s in self.manifest["shards"]] if self.kind == "chat" else []
        self._rows: dict[int, Rows] = {}

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer saved with the dataset (load it with `Tokenizer.load`)."""
        return self.directory / self.manifest["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def total_tokens(self) -> int:
        return int(self.manifest["total_tokens"])

    def _first_ids(self, seq_len: int) -> np.ndarray:
        """Global id of each shard's first sequence, plus the total at the end (len = shards + 1)."""
        if seq_len < 1:
            raise UserError(f"seq_len must be at least 1, got {seq_len} — use a positive sequence length")
        if seq_len not in self._starts:
            per_shard = np.maximum(self.shard_tokens - 1, 0) // seq_len
            self._starts[seq_len] = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        return self._starts[seq_len]

    def n_sequences(self, seq_len: int) -> int:
        """Number of packed sequences of `seq_len` (+1) tokens (rows of conversations for a chat dataset)."""
        if self.kind == "chat":
            return len(self.rows(seq_len).spans)
        return int(self._first_ids(seq_len)[-1])

    def rows(self, seq_len: int) -> Rows:
        """A chat dataset's rows of up to `seq_len` + 1 tokens (zili.data.packing.pack_rows), cached."""
        if seq_len < 1:
            raise UserError(f"seq_len must be at least 1, got {seq_len} — use a positive sequence length")
        if seq_len not in self._rows:
            try:
                self._rows[seq_len] = pack_rows(self._flags, seq_len + 1)
            except ValueError as e:
                raise UserError(f"dataset {self.directory}: {e} — {REPREPARE}") from None
        return self._rows[seq_len]

    def gather_rows(self, ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """A chat dataset's rows `ids`: tokens int64 and flags uint8, each (len(ids), seq_len + 1), padded with
        EOS tokens whose first is flagged START (a document of its own) and the rest 0."""
        spans = self.rows(seq_len).spans[np.asarray(ids, dtype=np.int64)]
        tokens = np.full((len(spans), seq_len + 1), self.eos_id, dtype=np.int64)
        flags = np.zeros((len(spans), seq_len + 1), dtype=np.uint8)
        for row, (shard, offset, length) in enumerate(spans.tolist()):
            tokens[row, :length] = self._shards[shard][offset : offset + length]
            flags[row, :length] = self._flags[shard][offset : offset + length]
            if length <= seq_len:
                flags[row, length] = START
        return tokens, flags

    def sequence(self, i: int, seq_len: int) -> np.ndarray:
        """Packed sequence `i`: `seq_len + 1` tokens (a read-only view into the memory-mapped shard)."""
        starts = self._first_ids(seq_len)
        if not 0 <= i < starts[-1]:
            raise IndexError(f"sequence {i} out of range [0, {int(starts[-1])}) at seq_len {seq_len}")
        shard = int(np.searchsorted(starts, i, side="right")) - 1
        offset = (int(i) - int(starts[shard])) * seq_len
        return self._shards[shard][offset: offset + seq_len + 1]

    def gather(self, ids: np.ndarray, seq_len: int) -> np.ndarray:
        """Sequences `ids` stacked into an int64 array of shape (len(ids), seq_len + 1)."""
        starts = self._first_ids(seq_len)
        ids = np.asarray(ids, dtype=np.int64)
        shards = np.searchsorted(starts, ids, side="right") - 1
        offsets = (ids - starts[shards]) * seq_len
        out = np.empty((ids.size, seq_len + 1), dtype=np.int64)
        for row, (shard, offset) in enumerate(zip(shards.tolist(), offsets.tolist())):
            out[row] = self._shards[shard][offset: offset + seq_len + 1]
        return out

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads all data); UserError on a mismatch."""
        for s in self.manifest["shards"]:
            for part in (s, s["flags"]) if self.kind == "chat" else (s,):
                if file_sha256(self.directory / part["file"]) != part["sha256"]:
                    raise UserError(f"shard {self.directory / part['file']} does not match its checksum — "
                                    f"{REPREPARE}")


def validation_ids(n_sequences: int, val_fraction: float) -> np.ndarray:
    """The held-out ids: max(1, round(val_fraction * n)) ids spread evenly (0 if val_fraction is 0)."""
    if val_fraction <= 0 or n_sequences == 0:
        return np.empty(0, dtype=np.int64)
    n_val = min(n_sequences, max(1, round(val_fraction * n_sequences)))
    return ((np.arange(n_val, dtype=np.int64) * 2 + 1) * n_sequences) // (2 * n_val)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch): argsort of PCG64 raw draws."""
    generator = np.random.PCG64(np.random.SeedSequence([seed % 2**64, epoch]))
    return np.argsort(generator.random_raw(n), kind="stable")


class Loader:
    """Batches of packed sequences for one rank. `batch_size` is the global batch, in sequences."""

    def __init__(self, dataset: PackedDataset, seq_len: int, batch_size: int, seed: int, val_fraction: float,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise UserError(f"batch_size {batch_size} is not a positive multiple of the {world_size} data-parallel "
                            f"ranks — use a batch size divisible by {world_size}")
        if not 0 <= val_fraction < 1:
            raise UserError(f"val_fraction {val_fraction} is outside [0, 1) — use e.g. 0.01")
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        n = dataset.n_sequences(seq_len)
        self.val_ids = validation_ids(n, val_fraction)
        train = np.ones(n, dtype=bool)
        train[self.val_ids] = False
        self.train_ids = np.flatnonzero(train).astype(np.int32 if n < 2**31 else np.int64)
        if self.n_train < batch_size:
            raise UserError(self._too_small_message(n, val_fraction))
        self.position = 0
        self.last_batch_ids: list[int] = []
        self._orders: dict[int, np.ndarray] = {}

    def _too_small_message(self, n: int, val_fraction: float) -> str:
        need = self.batch_size
        while need - validation_ids(need, val_fraction).size < self.batch_size:
            need += 1
        return (f"dataset {self.dataset.directory} ({self.dataset.total_tokens} tokens) gives {n} sequences of "
                f"{self.seq_len} tokens, {self.n_train} for training, fewer than one global batch of "
                f"{self.batch_size} — that needs at least {need * self.seq_len + 1} tokens: use more data, or a "
                f"smaller batch_size or seq_len")

    @property
    def n_train(self) -> int:
        return int(self.train_ids.size)

    @property
    def n_val(self) -> int:
        return int(self.val_ids.size)

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed: position / n_train."""
        return self.position / self.n_train

    def _order(self, epoch: int) -> np.ndarray:
        """Train ids in epoch `epoch`'s order (the last two epochs are cached)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = self.train_ids[epoch_permutation(self.n_train, self.seed, epoch)]
        return self._orders[epoch]

    def global_batch_ids(self, position: int) -> np.ndarray:
        """The `batch_size` train ids consumed from `position` on, across epoch boundaries."""
        parts, need = [], self.batch_size
        while need:
            epoch, offset = divmod(position, self.n_train)
            part = self._order(epoch)[offset: offset + need]
            parts.append(part)
            need -= part.size
            position += part.size
        return np.concatenate(parts).astype(np.int64)

    def _rank_slice(self, ids: np.ndarray) -> np.ndarray:
        per_rank = self.batch_size // self.world_size
        return ids[self.rank * per_rank: (self.rank + 1) * per_rank]

    def _tensors(self, ids: np.ndarray) -> tuple[torch.Tensor, ...]:
        if self.dataset.kind == "chat":
            return tuple(torch.from_numpy(a) for a in row_tensors(*self.dataset.gather_rows(ids, self.seq_len)))
        tokens = self.dataset.gather(ids, self.seq_len)
        inputs, targets = np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(inputs, targets) for this rank: int64 CPU tensors of shape (batch_size // world_size, seq_len); for a
        chat dataset (inputs, targets, documents), targets IGNORE where not trained (zili.data.packing)."""
        ids = self._rank_slice(self.global_batch_ids(self.position))
        self.position += self.batch_size
        self.last_batch_ids = ids.tolist()
        return self._tensors(ids)

    def val_batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """The same `n_batches` validation batches every call (cycling over the validation ids); none if n_val is 0."""
        if self.n_val == 0:
            return
        for k in range(n_batches):
            ids = self.val_ids[(k * self.batch_size + np.arange(self.batch_size)) % self.n_val]
            yield self._tensors(self._rank_slice(ids))

    def state_dict(self) -> dict:
        """{"position": train sequences consumed globally, "epoch": whole epochs completed}."""
        return {"position": self.position, "epoch": self.position // self.n_train}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["position"]` (works under any world size; "epoch" is informational)."""
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"loader position must be >= 0, got {position}")
        self.position = position
