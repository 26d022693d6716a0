"""Input files -> a stream of text documents (str), for `prepare`.

Inputs are files or directories; directories are walked recursively in sorted order, skipping hidden
entries (names starting with "."). A `.jsonl` file gives one document per non-blank line, read from the
field `text_key`; any other file is one UTF-8 document. Documents are streamed: at most one whole
non-jsonl file (or one jsonl line) is held in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

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
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key)
        else:
            yield _read_text(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}) — convert it to UTF-8 "
                        f"or leave it out of the inputs") from None


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="\n") as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                yield _jsonl_text(path, line_no, line, text_key)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 (near line {line_no + 1}) — convert the file to UTF-8") from None


def _jsonl_text(path: Path, line_no: int, line: str, text_key: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise UserError(f"{path}:{line_no} is not valid JSON ({e}) — fix the line or remove it") from None
    if not isinstance(record, dict) or text_key not in record:
        raise UserError(f"{path}:{line_no} has no field {text_key!r} — name the field that holds the text "
                        f"(text_key) or fix the line")
    text = record[text_key]
    if not isinstance(text, str):
        raise UserError(f"{path}:{line_no}: field {text_key!r} is {type(text).__name__}, not a string "
                        f"— fix the line")
    return text
