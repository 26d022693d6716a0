"""`zili data prepare`: text, jsonl and Parquet files -> token shards + manifest.json + a copy of the tokenizer.

Every document is tokenized (no special tokens added) and followed by the tokenizer's EOS id; empty
documents are dropped. Tokens are concatenated in input order and cut into shards of at most
`shard_tokens` tokens (see `shards.py`); `manifest.json` describes them (see `manifest.py`) and the
tokenizer is saved to `output/tokenizer/`.

The dataset is built in a temporary directory next to `output` and renamed into place at the end, so
`output` is either absent or complete. With `workers=1` documents are tokenized in this process in batches
of about `BATCH_CHARS` characters with `encode_batch` (parallel in Rust). With `workers > 1` batches of about
`POOL_BATCH_CHARS` characters go to that many worker processes (one Rust thread each; see `workers.py`), and
their tokens are written in input order, so the output is byte-identical whatever `workers`; a corpus of at
most `LOOKAHEAD_BATCHES` such batches is tokenized in this process, as starting workers costs seconds.
Shards are streamed to disk, so memory is bounded by the batches in flight (or one very large document)
whatever the corpus size. Files are read, and documents cut into batches, in this process only: input
errors name the file and line wherever the tokenizing happens.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zili.data.chat import load_chat_template
from zili.data.chat_dataset import write_chat_into
from zili.data.documents import find_files, read_documents
from zili.data.manifest import FORMAT, write_manifest
from zili.data.readers import file_kind, read_records
from zili.data.shards import ShardWriter, dtype_name, token_dtype
from zili.data.tokenizer import Tokenizer
from zili.data.workers import WorkerPool, tokenize
from zili.errors import UserError
from zili.fsio import check_writable

BATCH_CHARS = 4 << 20  # characters of text per encode_batch call in this process
POOL_BATCH_CHARS = 1 << 20  # characters per batch sent to a worker: small, as 2 per worker are in flight
BATCH_DOCS = 4096  # documents per batch at most
LOOKAHEAD_BATCHES = 8  # with workers > 1, a corpus of at most this many batches (~8 MB) is tokenized here
MAX_DEFAULT_WORKERS = 32  # beyond this one reading process rather than tokenizing is the bottleneck
MIN_POOL_CORES = 4  # below this many cores the default is to tokenize in this process
TOKENIZER_SUBDIR = "tokenizer"
FORMATS = ("text", "chat")


def default_workers() -> int:
    """The CPU cores this process may use, at most MAX_DEFAULT_WORKERS — or 1 below MIN_POOL_CORES, where the
    encoder's own Rust threads already use every core and worker processes measured no faster
    (BENCHMARKS.md, "Data preparation throughput")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if cores < MIN_POOL_CORES else min(cores, MAX_DEFAULT_WORKERS)


def prepare(inputs: list[str | Path], tokenizer_dir: str | Path, output: str | Path, text_key: str = "text",
            shard_tokens: int = 2**27, workers: int = 1, progress: bool = False, format: str = "text") -> dict:
    """Tokenize the files/directories `inputs` with the tokenizer in `tokenizer_dir` into `output`.

    `text_key` is the jsonl field or Parquet column holding the text; see `write_dataset` for `workers` and
    `progress`. `format="chat"`: the records are conversations, written as a chat dataset for fine-tuning
    (zili.data.chat_dataset; `text_key`, `workers` and `progress` do not apply). Returns the manifest.
    UserError for: a missing input, an unreadable (undecodable, corrupt, truncated) file, a bad jsonl line or
    Parquet row, a missing optional package, a corpus with no tokens, an `output` that exists and is not empty.
    """
    output = Path(output)
    _check_output(output)
    if shard_tokens < 2:
        raise UserError(f"shard_tokens must be at least 2, got {shard_tokens} — use a larger value")
    if format not in FORMATS:
        raise UserError(f"format {format!r} is not one of {', '.join(FORMATS)} — use text or chat")
    files = find_files(inputs)
    tokenizer = Tokenizer.load(tokenizer_dir)
    source = ", ".join(str(p) for p in inputs) or "(no inputs)"
    if format == "chat":
        template = load_chat_template(tokenizer_dir)
        return _build(output, lambda tmp: write_chat_into(tmp, _conversations(files), tokenizer, template,
                                                          shard_tokens), source)
    return write_dataset(read_documents(files, text_key), tokenizer, output, shard_tokens, source, workers, progress)


def _conversations(files: list[Path]) -> Iterator[tuple[str, object]]:
    """(where, record) of every conversation in `files` (JSONL lines, or the `messages` column of Parquet)."""
    for path in files:
        if file_kind(path)[0] == "text":
            raise UserError(f"{path} is plain text, but a chat dataset reads conversations — give JSONL or Parquet "
                            "files of {\"messages\": [...]} records")
        yield from read_records(path, ("messages",))


def write_dataset(documents: Iterable[str], tokenizer: Tokenizer, output: str | Path,
                  shard_tokens: int = 2**27, source: str = "the inputs", workers: int = 1,
                  progress: bool = False) -> dict:
    """Tokenize `documents` into a prepared dataset at `output` (atomically); returns the manifest.

    `source` names the corpus in the error raised when it holds no tokens. `workers`: tokenizing processes
    (1: this process only; the output is the same whatever the number). `progress`: show a bar of documents
    tokenized on stderr when it is a terminal.
    """
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers} — use 1 to tokenize in this process")
    return _build(Path(output), lambda tmp: _write_into(tmp, documents, tokenizer, shard_tokens, workers, progress),
                  source)


def _build(output: Path, fill, source: str) -> dict:
    """`fill(tmp)` writes the dataset into a temporary directory next to `output` and returns its manifest,
    written here; then the directory is renamed to `output`. Nothing is left behind on an error."""
    _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = fill(tmp)
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
    check_writable(output, "output")


def _write_into(directory: Path, documents: Iterable[str], tokenizer: Tokenizer, shard_tokens: int,
                workers: int, progress: bool) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(directory, dtype, shard_tokens)
    total = n_docs = 0
    bar = tqdm(unit=" docs", desc="tokenizing", file=sys.stderr, dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    # closing(): a failure here (e.g. a full disk) also stops the worker processes at once
    with bar, closing(_tokenized(documents, tokenizer, workers)) as results:
        for tokens, count in results:
            writer.write(tokens)
            total += tokens.size
            n_docs += count
            bar.set_postfix_str(f"{total:,} tokens", refresh=False)
            bar.update(count)
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


def _tokenized(documents: Iterable[str], tokenizer: Tokenizer, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, documents with tokens) per batch of `documents`, in input order (see `workers.tokenize`)."""
    if workers == 1:
        for batch in _batches(documents, BATCH_CHARS):
            yield tokenize(batch, tokenizer)
        return
    batches = _batches(documents, POOL_BATCH_CHARS)
    head = list(itertools.islice(batches, LOOKAHEAD_BATCHES + 1))
    if len(head) <= LOOKAHEAD_BATCHES:  # a small corpus: starting processes would cost more than it saves
        for batch in head:
            yield tokenize(batch, tokenizer)
        return
    with WorkerPool(tokenizer, workers) as pool:
        for batch in itertools.chain(head, batches):
            yield from pool.put(batch)
        yield from pool.drain()


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Group non-empty documents into lists of about `max_chars` characters (at most BATCH_DOCS)."""
    batch: list[str] = []
    chars = 0
    for text in documents:
        if not text:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= max_chars or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
