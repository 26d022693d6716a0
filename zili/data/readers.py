"""Input files -> records, one reader per file kind; `documents.py` takes the text out of the records.

The kind comes from the file name, looking through a compression suffix (`.gz`: gzip, `.zst`/`.zstd`: zstd):

- `X.parquet`: one record per row, `{column: value}` for the requested columns only, read one record batch
  (`PARQUET_BATCH_ROWS` rows) at a time with pyarrow, never the whole file;
- `X.jsonl`, `X.jsonl.gz`, `X.jsonl.zst`: one record per non-blank line, the line's JSON value;
- anything else, compressed or not (`X.txt`, `X.txt.gz`, `X.gz`, `X.zst`, ...): the whole file is one record,
  a str (UTF-8, line endings made "\\n" as Python's text mode does).

`read_records(path, columns)` yields `(where, record)` (for Parquet the `columns`, or every column when none
are asked for), `where` naming the file and the line (`path:N`, from 1) or row (`path row N`, from 0) for
error messages. Compressed files are decompressed as a stream, so memory
holds one line (jsonl), one record batch (Parquet) or one whole file (text). Every problem with the input is
a one-line UserError naming the file: corrupt or truncated compression, invalid JSON, not UTF-8, not Parquet,
a missing column, and a missing optional package (pyarrow, zstandard: `pip install 'zili[data]'`).
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from zili.errors import UserError

GZIP_SUFFIXES = (".gz",)
ZSTD_SUFFIXES = (".zst", ".zstd")
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow record batch
ZSTD_READ_BYTES = 1 << 16  # compressed bytes fed to the zstd decoder at a time
INSTALL = "pip install 'zili[data]'"
MAX_LISTED_COLUMNS = 20


def file_kind(path: Path) -> tuple[str, str | None]:
    """(kind, compression) of `path` by its name: kind 'parquet', 'jsonl' or 'text'; compression 'gzip',
    'zstd' or None."""
    name = path.name.lower()
    compression = None
    if name.endswith(GZIP_SUFFIXES):
        compression = "gzip"
    elif name.endswith(ZSTD_SUFFIXES):
        compression = "zstd"
    inner = Path(name).stem if compression else name
    if inner.endswith(".parquet"):
        if compression:
            raise UserError(f"{path}: a compressed Parquet file is not supported — decompress it (Parquet "
                            f"compresses its pages itself)")
        return "parquet", None
    return ("jsonl" if inner.endswith(".jsonl") else "text"), compression


def read_records(path: Path, columns: Sequence[str] = ()) -> Iterator[tuple[str, object]]:
    """Yield `(where, record)` for each record of `path` (see the module docstring); `columns` are the
    Parquet columns to read (other kinds ignore it)."""
    kind, compression = file_kind(path)
    if kind == "parquet":
        yield from _parquet_records(path, columns)
    elif kind == "jsonl":
        yield from _jsonl_records(path, compression)
    else:
        yield str(path), _read_text(path, compression)


def _jsonl_records(path: Path, compression: str | None) -> Iterator[tuple[str, object]]:
    errors = _decompression_errors(path, compression)
    line_no = 0
    # newline="\n": split lines on "\n" only and keep "\r" inside strings, as the JSONL format says
    with io.TextIOWrapper(_open_binary(path, compression), encoding="utf-8", newline="\n") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{line_no}", _parse_json(path, line_no, line)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 (near line {line_no + 1}) — convert the file to UTF-8") from None
        except errors as e:
            raise _corrupt(path, compression, e, f"near line {line_no + 1}") from None


def _parse_json(path: Path, line_no: int, line: str) -> object:
    try:
        return json.loads(line)
    except ValueError as e:
        raise UserError(f"{path}:{line_no} is not valid JSON ({e}) — fix the line or remove it") from None


def _read_text(path: Path, compression: str | None) -> str:
    errors = _decompression_errors(path, compression)
    try:
        with _open_binary(path, compression) as f:
            data = f.read()
    except errors as e:
        raise _corrupt(path, compression, e) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        decompressed = " of the decompressed text" if compression else ""
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}{decompressed}) — convert it to UTF-8 "
                        f"or leave it out of the inputs") from None
    if "\r" in text:  # universal newlines, as Path.read_text reads a plain file
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _open_binary(path: Path, compression: str | None) -> BinaryIO:
    """`path` opened for reading, decompressed as a stream."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(path, _import("zstandard", path)))
    return open(path, "rb")


def _decompression_errors(path: Path, compression: str | None) -> tuple[type[BaseException], ...]:
    """The exceptions that mean corrupt or truncated compressed data (none for an uncompressed file)."""
    if compression == "gzip":
        return gzip.BadGzipFile, EOFError, zlib.error
    if compression == "zstd":
        return _import("zstandard", path).ZstdError, EOFError
    return ()


def _corrupt(path: Path, compression: str | None, error: BaseException, where: str = "") -> UserError:
    detail = f"{where}: {error}" if where else str(error)
    return UserError(f"{path} is not a valid {compression} file or is truncated ({detail}) — download or "
                     f"compress it again")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame; EOFError if the file ends inside a frame.

    zstandard's own `stream_reader` returns a truncated file's partial output without an error, hence this.
    """

    def __init__(self, path: Path, zstandard):
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the current frame
        self._carry = b""  # input left after the end of a frame: the start of the next one
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._carry or self._file.read(ZSTD_READ_BYTES)
            self._carry = b""
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            self._out = memoryview(self._frame.decompress(data))
            if self._frame.eof:
                self._carry = self._frame.unused_data
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _parquet_records(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, object]]:
    pa = _import("pyarrow", path)
    parquet = _import("pyarrow.parquet", path)
    columns = list(columns)
    try:
        source = parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}) — check the file or give it "
                        f"another extension") from None
    with source:
        names = source.schema_arrow.names
        columns = columns or list(names)  # none asked for: every column
        for column in columns:
            if column not in names:
                listed = ", ".join(repr(n) for n in names[:MAX_LISTED_COLUMNS])
                more = f" and {len(names) - MAX_LISTED_COLUMNS} more" if len(names) > MAX_LISTED_COLUMNS else ""
                raise UserError(f"{path} has no column {column!r} (its columns: {listed}{more}) — name the "
                                f"text column (text_key, --text-key)")
        row = 0
        try:
            for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                values = [batch.column(name).to_pylist() for name in columns]
                for record in zip(*values):
                    yield f"{path} row {row}", dict(zip(columns, record))
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} is corrupt near row {row} ({e}) — download or write it again") from None


def _import(module: str, path: Path):
    """The optional package `module`, imported here rather than at the top so that zili works without it
    for inputs that do not need it; UserError naming `path` and the extra to install if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"reading {path} needs the '{module.split('.')[0]}' package, which is not installed — "
                        f"{INSTALL}") from None
