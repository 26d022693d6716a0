"""`zili data prepare`: text files and jsonl -> token shards + manifest.json + a copy of the tokenizer.

Every document is tokenized (no special tokens added) and followed by the tokenizer's EOS id; empty
documents are dropped. Tokens are concatenated in input order and cut into shards of at most
`shard_tokens` tokens (see `shards.py`); `manifest.json` describes them (see `manifest.py`) and the
tokenizer is saved to `output/tokenizer/`.

The dataset is built in a temporary directory next to `output` and renamed into place at the end, so
`output` is either absent or complete. Documents are tokenized in batches of about `BATCH_CHARS`
characters with `encode_batch` (parallel in Rust), and shards are streamed to disk, so memory is bounded
by one batch (or one very large document) whatever the corpus size.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from zili.data.documents import find_files, read_documents
from zili.data.manifest import FORMAT, write_manifest
from zili.data.shards import ShardWriter, dtype_name, token_dtype
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError

BATCH_CHARS = 4 << 20  # characters of text per encode_batch call
BATCH_DOCS = 4096  # documents per encode_batch call at most
TOKENIZER_SUBDIR = "tokenizer"


def prepare(inputs: list[str | Path], tokenizer_dir: str | Path, output: str | Path, text_key: str = "text",
            shard_tokens: int = 2**27) -> dict:
    """Tokenize the files/directories `inputs` with the tokenizer in `tokenizer_dir` into `output`.

    Returns the manifest. UserError for: a missing input, an undecodable file or bad jsonl line, a corpus
    with no tokens, an `output` that exists and is not empty.
    """
    output = Path(output)
    _check_output(output)
    if shard_tokens < 2:
        raise UserError(f"shard_tokens must be at least 2, got {shard_tokens} — use a larger value")
    files = find_files(inputs)
    tokenizer = Tokenizer.load(tokenizer_dir)
    source = ", ".join(str(p) for p in inputs) or "(no inputs)"
    return write_dataset(read_documents(files, text_key), tokenizer, output, shard_tokens, source)


def write_dataset(documents: Iterable[str], tokenizer: Tokenizer, output: str | Path,
                  shard_tokens: int = 2**27, source: str = "the inputs") -> dict:
    """Tokenize `documents` into a prepared dataset at `output` (atomically); returns the manifest.

    `source` names the corpus in the error raised when it holds no tokens.
    """
    output = Path(output)
    _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _write_into(tmp, documents, tokenizer, shard_tokens)
        if manifest["total_tokens"] == 0:
            raise UserError(f"the corpus {source} is empty (no text in {manifest['documents']} documents) "
                            f"— give files or jsonl lines that contain text")
        try:
            os.rename(tmp, output)
        except OSError:
            _check_output(output)  # someone else created it meanwhile: say so
            raise
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output {output} already exists and is not empty — pick another directory or delete it")


def _write_into(directory: Path, documents: Iterable[str], tokenizer: Tokenizer, shard_tokens: int) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(directory, dtype, shard_tokens)
    total = n_docs = 0
    for batch in _batches(documents):
        tokens, count = _tokenize(batch, tokenizer)
        writer.write(tokens)
        total += tokens.size
        n_docs += count
    shards = writer.close()
    tokenizer.save(directory / TOKENIZER_SUBDIR)
    manifest = {
        "format": FORMAT,
        "dtype": dtype_name(dtype),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "total_tokens": total,
        "documents": n_docs,
        "shards": shards,
        "tokenizer": TOKENIZER_SUBDIR,
    }
    write_manifest(directory, manifest)
    return manifest


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Group non-empty documents into lists of about BATCH_CHARS characters (at most BATCH_DOCS)."""
    batch: list[str] = []
    chars = 0
    for text in documents:
        if not text:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(texts: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(tokens of all texts, each followed by EOS, as int64; number of documents that had tokens)."""
    flat: list[int] = []
    count = 0
    eos = tokenizer.eos_id
    for ids in tokenizer.encode_batch(texts):
        if ids:
            flat.extend(ids)
            flat.append(eos)
            count += 1
    tokens = np.array(flat, dtype=np.int64)
    if tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < tokenizer.vocab_size:
        raise RuntimeError("the tokenizer produced an id outside [0, vocab_size)")
    return tokens, count
