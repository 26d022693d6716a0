"""`zili data prepare --format chat`: conversations -> a chat dataset (zili.data.packing's layout).

Each record is a conversation, `{"messages": [{"role", "content"}, ...]}` (zili.data.chat.validate_conversation),
from JSONL lines or the `messages` column of Parquet files. It is rendered with the tokenizer's chat template
(`chat_template.jinja` or `chat_template` in tokenizer_config.json; zili's default ChatML otherwise) into token
ids and the assistant mask (zili.data.chat.encode_conversation). The tokens go to `shard-NNNNN.bin` as for text;
`flags-NNNNN.bin` holds one byte per token: TRAIN on the assistant tokens, START on each conversation's first
token. A shard holds whole conversations (at most `shard_tokens` tokens, unless one conversation alone is
longer). The template used is written into the dataset's tokenizer copy (`tokenizer/chat_template.jinja`), so a
run trained on the data, and `zili chat` on that run, render conversations the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from zili.data.chat import TEMPLATE_FILE, ChatTemplate, encode_conversation, validate_conversation
from zili.data.manifest import FORMAT, write_manifest
from zili.data.packing import START, TRAIN
from zili.data.shards import dtype_name, shard_name, token_dtype
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError


class _PairedShards:
    """Token shards and their flags, cut between conversations."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._tokens: list[np.ndarray] = []
        self._flags: list[np.ndarray] = []
        self._count = 0

    def add(self, tokens: np.ndarray, flags: np.ndarray) -> None:
        if self._count and self._count + tokens.size > self.shard_tokens:
            self._finish()
        self._tokens.append(tokens.astype(self.dtype))
        self._flags.append(flags)
        self._count += tokens.size

    def close(self) -> list[dict]:
        if self._count:
            self._finish()
        return self.shards

    def _finish(self) -> None:
        index = len(self.shards)
        entry = {"file": shard_name(index), "tokens": self._count}
        flags_name = shard_name(index).replace("shard-", "flags-")
        for name, parts, key in ((entry["file"], self._tokens, None), (flags_name, self._flags, "flags")):
            data = np.concatenate(parts).tobytes()
            (self.directory / name).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            if key is None:
                entry["sha256"] = digest
            else:
                entry["flags"] = {"file": name, "sha256": digest}
        self.shards.append(entry)
        self._tokens, self._flags, self._count = [], [], 0


def conversation_arrays(tokenizer: Tokenizer, template: ChatTemplate, record: object, where: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, flags) of one conversation record; UserError naming `where` (file and line) if it is invalid."""
    try:
        messages = validate_conversation(record)
        ids, mask = encode_conversation(tokenizer, template, messages)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    flags = np.where(np.asarray(mask, dtype=bool), TRAIN, 0).astype(np.uint8)
    flags[0] |= START
    return np.asarray(ids, dtype=np.int64), flags


def write_chat_into(directory: Path, records: Iterable[tuple[str, object]], tokenizer: Tokenizer,
                    template: ChatTemplate, shard_tokens: int) -> dict:
    """Write the shards, flags, tokenizer (with its template) and manifest of `records` — (where, record) pairs —
    into `directory`; returns the manifest."""
    writer = _PairedShards(directory, token_dtype(tokenizer.vocab_size), shard_tokens)
    conversations = trained = 0
    for where, record in records:
        tokens, flags = conversation_arrays(tokenizer, template, record, where)
        writer.add(tokens, flags)
        conversations += 1
        trained += int((flags & TRAIN).astype(bool).sum())
    shards = writer.close()
    tokenizer.save(directory / "tokenizer")
    (directory / "tokenizer" / TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
    manifest = {"format": FORMAT, "kind": "chat", "dtype": dtype_name(token_dtype(tokenizer.vocab_size)),
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "total_tokens": sum(s["tokens"] for s in shards), "documents": conversations,
                "trained_tokens": trained, "shards": shards, "tokenizer": "tokenizer"}
    write_manifest(directory, manifest)
    return manifest
