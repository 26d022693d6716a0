"""`manifest.json`: the table of contents of a prepared dataset directory.

    {"format": 1, "dtype": "uint16" | "uint32", "vocab_size": int, "eos_id": int,
     "total_tokens": int, "documents": int,
     "shards": [{"file": "shard-00000.bin", "tokens": int, "sha256": hex}, ...],
     "tokenizer": "tokenizer"}

`tokens` and `total_tokens` count tokens (not bytes); a shard file is `tokens * itemsize` bytes.
`tokenizer` is the tokenizer directory, relative to the dataset directory.

A chat dataset (conversations for fine-tuning, zili.data.packing) also has `"kind": "chat"` and, in each
shard, `"flags": {"file": "flags-00000.bin", "sha256": hex}`: one byte per token. Without `kind`, "text".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from zili.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = ("uint16", "uint32")
REQUIRED = ("format", "dtype", "vocab_size", "eos_id", "total_tokens", "documents", "shards", "tokenizer")
KINDS = ("text", "chat")
REPREPARE = "re-run `zili data prepare` to rebuild it"


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Write `directory/manifest.json` (pretty JSON, trailing newline)."""
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(directory: str | Path) -> dict:
    """Read and check `directory/manifest.json`: fields, format, dtype, shard sizes on disk.

    Raises UserError (saying to re-run `zili data prepare`) for a missing directory or manifest, an
    unreadable or inconsistent manifest, or a shard whose file is missing or has the wrong byte size.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"dataset {directory} does not exist — run `zili data prepare` to create it, "
                        f"or point at an existing prepared dataset")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}, so it is not a prepared dataset — {REPREPARE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in REQUIRED if key not in manifest]
        if missing:
            raise KeyError(", ".join(missing))
        shard_fields = [(s["file"], int(s["tokens"]), s["sha256"]) for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}) — {REPREPARE}") from None
    if manifest["format"] != FORMAT:
        raise UserError(f"{path} has format {manifest['format']!r}, this zili reads format {FORMAT} — {REPREPARE}")
    if manifest["dtype"] not in DTYPES:
        raise UserError(f"{path} has dtype {manifest['dtype']!r}, expected one of {DTYPES} — {REPREPARE}")
    if sum(tokens for _, tokens, _ in shard_fields) != manifest["total_tokens"]:
        raise UserError(f"{path}: shard token counts do not add up to total_tokens — {REPREPARE}")
    kind = manifest.setdefault("kind", "text")
    if kind not in KINDS:
        raise UserError(f"{path} has kind {kind!r}, expected one of {KINDS} — {REPREPARE}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    files = [(name, tokens * itemsize, tokens) for name, tokens, _ in shard_fields]
    if kind == "chat":
        try:
            files += [(s["flags"]["file"], s["tokens"], s["tokens"]) for s in manifest["shards"]]
        except (KeyError, TypeError) as e:
            raise UserError(f"{path} is a chat dataset without the flags of every shard ({e}) — {REPREPARE}") from None
    for name, expected, tokens in files:
        shard = directory / name
        if not shard.is_file():
            raise UserError(f"shard {shard} is missing — {REPREPARE}")
        size = shard.stat().st_size
        if size != expected:
            raise UserError(f"shard {shard} is {size} bytes but the manifest says {tokens} tokens "
                            f"({expected} bytes) — {REPREPARE}")
    return manifest


def fingerprint(manifest: dict) -> str:
    """The identity of a prepared dataset's content, from its manifest alone (nothing is read): hex sha256 of its
    token dtype, kind, vocabulary size, EOS id and every shard's file name, token count and sha256 (and flags'
    sha256 for a chat dataset). The same data moved or copied elsewhere has the same fingerprint; a dataset
    prepared again from other files, or with another tokenizer, has another one. 32 hex digits."""
    shards = [{"file": s["file"], "tokens": int(s["tokens"]), "sha256": s["sha256"],
               "flags": (s.get("flags") or {}).get("sha256")} for s in manifest["shards"]]
    identity = {"dtype": manifest["dtype"], "kind": manifest.get("kind", "text"),
                "vocab_size": int(manifest["vocab_size"]), "eos_id": int(manifest["eos_id"]), "shards": shards}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
