"""Input files -> a stream of text documents (str), for `prepare`.

Inputs are files or directories; directories are walked recursively in sorted order, skipping hidden
entries (names starting with "."), so the documents come in the same order on every run. `readers.py`
turns each file into records by its kind: a `.jsonl` file (also `.jsonl.gz`, `.jsonl.zst`) gives one
document per non-blank line, read from the field `text_key`; a `.parquet` file one per row, read from the
column `text_key`; any other file (plain, `.gz` or `.zst`) is one UTF-8 document. Documents are streamed:
at most one whole text file, one jsonl line or one Parquet record batch is held in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from zili.data.readers import file_kind, read_records
from zili.errors import UserError


def find_files(inputs: list[str | Path]) -> list[Path]:
    """The files named by `inputs`, directories expanded recursively (sorted); UserError if one is missing."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_walk(path))
        else:
            raise UserError(f"input {path} does not exist — pass existing files or directories")
    return files


def _walk(directory: Path) -> Iterator[Path]:
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child)
        elif child.is_file():
            yield child


def read_documents(files: list[Path], text_key: str = "text") -> Iterator[str]:
    """Yield the documents of `files` in order (see the module docstring for the rules)."""
    for path in files:
        whole_file = file_kind(path)[0] == "text"
        for where, record in read_records(path, (text_key,)):
            yield record if whole_file else field_text(where, record, text_key)


def field_text(where: str, record: object, text_key: str) -> str:
    """The string in field `text_key` of a jsonl/Parquet `record`; UserError naming `where` otherwise."""
    if not isinstance(record, dict) or text_key not in record:
        raise UserError(f"{where} has no field {text_key!r} — name the field that holds the text "
                        f"(text_key, --text-key) or fix the line")
    text = record[text_key]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise UserError(f"{where}: field {text_key!r} is {kind}, not a string — fix the record or name "
                        f"another field (text_key, --text-key)")
    return text
