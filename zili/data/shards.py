"""Token shards on disk: raw little-endian numpy arrays, `shard-00000.bin`, `shard-00001.bin`, ...

A shard is nothing but its tokens (no header): `tokens * itemsize` bytes of `uint16` when the vocabulary
fits in 16 bits, else `uint32`. `ShardWriter` streams tokens into shards of at most `shard_tokens` tokens
each, hashing (sha256) as it writes, so memory stays bounded by the arrays handed to `write`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

HASH_CHUNK_BYTES = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id in `[0, vocab_size)`: uint16 or uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    """'uint16' or 'uint32', as the manifest spells it."""
    return np.dtype(dtype).name


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Append tokens to `directory/shard-NNNNN.bin` files of at most `shard_tokens` tokens each.

    Call `write(tokens)` any number of times, then `close()`, which returns the manifest's shard list:
    `[{"file": name, "tokens": count, "sha256": hex}, ...]`. Empty shards are never written.
    """

    def __init__(self, directory: str | Path, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 2:
            raise ValueError(f"shard_tokens must be at least 2, got {shard_tokens}")
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` (any integer array whose values fit the dtype), opening new shards as they fill."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open()
            take = min(tokens.size, self.shard_tokens - self._count)
            data = tokens[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Finish the last shard; returns the shard list."""
        if self._file is not None:
            self._finish()
        return self.shards

    def _open(self) -> None:
        name = shard_name(len(self.shards))
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._count = 0
        self._name = name

    def _finish(self) -> None:
        self._file.close()
        self.shards.append({"file": self._name, "tokens": self._count, "sha256": self._hash.hexdigest()})
        self._file = None
