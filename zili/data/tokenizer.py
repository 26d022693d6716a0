"""The tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`, and byte-level BPE training.

A tokenizer lives in a directory as `tokenizer.json` (the `tokenizers` serialization) plus
`tokenizer_config.json` (what `transformers.AutoTokenizer.from_pretrained(directory)` needs). Both are
plain JSON. `encode` never adds special tokens (no BOS); documents are terminated with `eos_id` by the
caller. Ids are ints in `[0, vocab_size)`; `vocab_size` counts special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from zili.errors import UserError

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
MIN_VOCAB = 257  # the 256 byte symbols plus EOS


def _default_config(eos: str) -> dict:
    """A `tokenizer_config.json` that makes AutoTokenizer load `tokenizer.json` as-is: EOS set, no BOS."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }


def _token_name(value) -> str | None:
    """A special token in tokenizer_config.json is either a string or {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids. Wraps `tokenizers.Tokenizer`; `config` is the tokenizer_config.json dict."""

    def __init__(self, hf: tokenizers.Tokenizer, config: dict | None = None):
        self._hf = hf
        self._config = dict(config) if config is not None else _default_config(EOS)
        eos = _token_name(self._config.get("eos_token")) or EOS
        eos_id = hf.token_to_id(eos)
        if eos_id is None:
            raise UserError(f"the tokenizer has no end-of-text token {eos!r} — add it as a special token, "
                            f"or set eos_token in {CONFIG_FILE}")
        self._eos_id = eos_id
        self._eos = eos
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read `directory/tokenizer.json` (and `tokenizer_config.json` if present, for the EOS token)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no {TOKENIZER_FILE} in {directory} — point at a tokenizer directory "
                            f"(e.g. a Hugging Face model folder or one saved by zili)")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise UserError(f"cannot read {path}: {e} — use a tokenizer.json written by `tokenizers`") from None
        config = None
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{config_path} is not valid JSON ({e}) — fix or delete it") from None
        return cls(hf, config)

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(directory / TOKENIZER_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self._config, indent=2) + "\n", encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel on the Rust side."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included, so `decode(encode(t)) == t` for byte-level BPE."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token that separates documents."""
        return self._eos_id

    @property
    def eos_token(self) -> str:
        """The end-of-text token as text (`<|endoftext|>` unless tokenizer_config.json names another)."""
        return self._eos

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face `tokenizers.Tokenizer`."""
        return self._hf


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
              individual_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, `<|endoftext|>` as id 0) on `texts`.

    `vocab_size` counts the 256 byte symbols, the merges and the special tokens; the result can be smaller
    when the texts do not support that many merges. `special_tokens` come after `<|endoftext|>` (ids 1, 2, ...;
    e.g. the chat markers `<|im_start|>`, `<|im_end|>` of zili.data.chat, each then one id).
    `individual_digits` splits numbers into single digits before BPE (as Qwen2's tokenizer does), so no token
    spans two digits — arithmetic sees every digit on its own.
    """
    if vocab_size < MIN_VOCAB + len(special_tokens):
        raise UserError(f"vocab_size {vocab_size} is too small for byte-level BPE — use at least "
                        f"{MIN_VOCAB + len(special_tokens)}")
    hf = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if individual_digits else byte_level)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    documents = 0

    def counted(texts):
        nonlocal documents
        for text in texts:
            documents += bool(text)
            yield text

    hf.train_from_iterator(counted(texts), trainer=trainer)
    if not documents:
        raise UserError("no text to train the tokenizer on (the input is empty) — give files or jsonl lines that "
                        "contain text")
    return Tokenizer(hf)
