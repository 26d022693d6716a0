"""`zili eval MODEL --data DIR|FILE`: loss, perplexity and bits per byte of a model on held-out text.

The model is a run directory's newest (or chosen) checkpoint or a Hugging Face directory
(`zili.infer.chat.load_chat_model`), evaluated in fp32 with gradients off.

The data is one of:

- A prepared dataset (a directory `zili data prepare` wrote): its validation split, exactly the sequences
  training holds out — `zili.data.loader.validation_ids` over the packed sequences of `seq_len` (+1) tokens
  with `val_fraction` (by default the run's own `training.seq_len` and `data.val_fraction`; for a Hugging Face
  directory the model's max_seq_len up to 2048, and 0.01). Each validation sequence is evaluated once, in id
  order, `batch_size` at a time (the last batch may be smaller); `max_batches` stops after that many batches.
  A chat dataset (manifest kind "chat") counts only the trained targets (assistant tokens), conversations
  packed apart with their document ids, as supervised fine-tuning computes its loss. The dataset must have
  been prepared with the model's tokenizer (same vocabulary).
- A text file (UTF-8): encoded whole with the model's tokenizer, one end-of-text token put before it (the
  context the first token is predicted from, as after a document boundary in training), then cut into
  windows of `seq_len` + 1 tokens, window k starting at token k * seq_len — consecutive windows share one
  token, so every token of the file is predicted exactly once (the last window may be shorter). All windows
  are evaluated, unless `max_batches` stops earlier.

Figures: `loss` = total nats / counted target tokens (nats per token); `perplexity` = exp(loss);
`bits_per_byte` = total nats / ln 2 / bytes, where `bytes` is the UTF-8 size of the text the counted target
tokens spell: the tokenizer's decoding of them with special tokens (end-of-text, chat markers) left out — they
count zero bytes but their nats count. A text file's targets are decoded in one piece (for byte-level BPE that
is the file's own size); a dataset's a sequence at a time (a character cut at a sequence boundary decodes to
U+FFFD, 3 bytes: negligible).

The trainer's `val_loss` (zili.train.trainer.Trainer.validate) on a plain dataset is the mean over
`training.eval_batches` batches of `training.batch_size` validation sequences taken in this same order; so
`--batch-size B --max-batches E` with the run's B and E gives the same figure (while B x E does not exceed the
validation sequences, which the trainer would start over). On a chat dataset the trainer averages per-batch
means; this is the mean over all counted tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from zili.config import DataConfig, load_config
from zili.data.loader import PackedDataset, validation_ids
from zili.data.packing import IGNORE, row_tensors
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError
from zili.infer.chat import load_chat_model
from zili.models.loss import cross_entropy
from zili.models.transformer import Transformer

DEFAULT_SEQ_LEN = 2048  # the longest default window for a model without a run config (lm-eval's default too)

# inputs, targets (IGNORE = not counted), documents (chat rows) or None, and the bytes the counted targets spell
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: what was evaluated and the figures (units in the names and the module doc)."""

    model: str
    data: str
    split: str  # "validation" (a prepared dataset's validation split) or "text" (a text file)
    seq_len: int
    sequences: int  # sequences (dataset) or windows (text file) evaluated
    tokens: int  # counted target tokens
    bytes: int  # UTF-8 bytes those targets spell (special tokens: 0)
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float

    def table(self) -> str:
        what = (f"validation split, {self.sequences} sequence(s) of {self.seq_len} tokens" if self.split == "validation"
                else f"text file, {self.sequences} window(s) of up to {self.seq_len} tokens")
        rows = [("model", self.model), ("data", f"{self.data} ({what})"), ("tokens", f"{self.tokens:,}"),
                ("bytes", f"{self.bytes:,}"), ("loss", f"{self.loss:.4f} nats/token"),
                ("perplexity", f"{self.perplexity:.4f}"), ("bits per byte", f"{self.bits_per_byte:.4f}")]
        return "\n".join(f"{name:<14}{value}" for name, value in rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def evaluate_data(model_path: str | Path, data: str | Path, *, seq_len: int | None = None, batch_size: int = 8,
                  max_batches: int | None = None, val_fraction: float | None = None, step: int | None = None,
                  device: str = "auto") -> EvalResult:
    """Evaluate the model at `model_path` on `data` (a prepared dataset directory or a text file); see the module
    doc for the defaults of `seq_len` and `val_fraction` (the latter only for a dataset). UserError for a missing
    path, a dataset of another vocabulary, an empty text file, or `seq_len` above the model's max_seq_len."""
    model_path, data = Path(model_path), Path(data)
    if batch_size < 1 or (max_batches is not None and max_batches < 1) or (seq_len is not None and seq_len < 1):
        raise UserError("--batch-size, --max-batches and --seq-len must be positive")
    if not model_path.exists():
        raise UserError(f"model {model_path} not found — pass a run directory (`zili train`) or a Hugging Face "
                        "model directory")
    if not data.exists():
        raise UserError(f"--data {data} not found — pass a directory `zili data prepare` wrote or a UTF-8 text file")
    run = _run_settings(model_path)
    # the data's problems first: before a possibly large model is loaded
    dataset = PackedDataset(data) if data.is_dir() else None
    text = None if dataset else _read_text(data)
    model, tokenizer, _ = load_chat_model(model_path, step, device)
    limit = model.args.max_seq_len
    seq_len = seq_len or run.get("seq_len") or min(limit, DEFAULT_SEQ_LEN)
    if seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len {limit} — use at most {limit}")
    if dataset is not None:
        fraction = val_fraction if val_fraction is not None else run.get("val_fraction", DataConfig().val_fraction)
        batches, sequences = _dataset_batches(dataset, seq_len, batch_size, max_batches, fraction, tokenizer,
                                              model.args.vocab_size)
        split = "validation"
    else:
        batches, sequences = _text_batches(data, text, seq_len, batch_size, max_batches, tokenizer)
        split = "text"
    nats, tokens, n_bytes = _score(model, batches)
    if tokens == 0:
        raise UserError(f"{data}: the evaluated sequences have no counted target tokens — use a dataset with "
                        "assistant turns, or more --max-batches")
    loss = nats / tokens
    return EvalResult(model=str(model_path), data=str(data), split=split, seq_len=seq_len, sequences=sequences,
                      tokens=tokens, bytes=n_bytes, loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf,
                      bits_per_byte=nats / math.log(2) / n_bytes if n_bytes else math.inf)


def _run_settings(path: Path) -> dict:
    """{"seq_len", "val_fraction"} of a run directory's config.toml; {} for a Hugging Face directory (or a run
    without one, e.g. written by `zili import-hf`)."""
    if not (path / "config.toml").is_file():
        return {}
    cfg = load_config(path / "config.toml")
    return {"seq_len": cfg.training.seq_len, "val_fraction": cfg.data.val_fraction}


@torch.inference_mode()
def _score(model: Transformer, batches: Iterator[Batch]) -> tuple[float, int, int]:
    """(total nats, counted targets, their bytes) over the batches."""
    device = next(model.parameters()).device
    nats, count, n_bytes = 0.0, 0, 0
    for inputs, targets, documents, batch_bytes in batches:
        logits = model(inputs.to(device), documents=None if documents is None else documents.to(device))
        nats += float(cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), IGNORE, "sum"))
        count += int((targets != IGNORE).sum())
        n_bytes += batch_bytes
    return nats, count, n_bytes


def _utf8_bytes(tokenizer: Tokenizer, rows: list[list[int]]) -> int:
    """UTF-8 bytes of the texts `rows` of ids decode to, special tokens left out."""
    return sum(len(text.encode("utf-8")) for text in tokenizer.backend.decode_batch(rows, skip_special_tokens=True))


def _dataset_batches(dataset: PackedDataset, seq_len: int, batch_size: int, max_batches: int | None,
                     val_fraction: float, tokenizer: Tokenizer, model_vocab: int) -> tuple[Iterator[Batch], int]:
    """The validation batches of a prepared dataset (bytes decoded with the dataset's own tokenizer, whose
    vocabulary is the model's) and the number of sequences in them."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction {val_fraction} is outside (0, 1) — pass e.g. --val-fraction 0.01")
    directory = dataset.directory
    if dataset.vocab_size > model_vocab:
        raise UserError(f"dataset {directory} has a {dataset.vocab_size}-token vocabulary, the model only "
                        f"{model_vocab} — prepare the data with the model's tokenizer (zili data prepare --tokenizer)")
    own = Tokenizer.load(dataset.tokenizer_dir)
    if own.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise UserError(f"dataset {directory} was prepared with another tokenizer than the model's — prepare it "
                        "with the model's tokenizer (zili data prepare --tokenizer)")
    ids = validation_ids(dataset.n_sequences(seq_len), val_fraction)
    if max_batches is not None:
        ids = ids[: max_batches * batch_size]
    if not ids.size:
        raise UserError(f"dataset {directory} has no validation sequence of {seq_len} tokens at val_fraction "
                        f"{val_fraction} ({dataset.total_tokens} tokens) — use a smaller --seq-len or more data")

    def batches() -> Iterator[Batch]:
        for start in range(0, ids.size, batch_size):
            chunk = ids[start : start + batch_size]
            if dataset.kind == "chat":
                inputs, targets, documents = row_tensors(*dataset.gather_rows(chunk, seq_len))
            else:
                tokens = dataset.gather(chunk, seq_len)
                inputs, targets, documents = tokens[:, :-1].copy(), tokens[:, 1:].copy(), None
            n_bytes = _utf8_bytes(own, [row[row != IGNORE].tolist() for row in targets])
            yield (torch.from_numpy(inputs), torch.from_numpy(targets),
                   None if documents is None else torch.from_numpy(documents), n_bytes)

    return batches(), int(ids.size)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}) — pass a UTF-8 text file or a prepared "
                        "dataset directory") from None


def _text_batches(path: Path, text: str, seq_len: int, batch_size: int, max_batches: int | None,
                  tokenizer: Tokenizer) -> tuple[Iterator[Batch], int]:
    """The windows of a text file in batches (targets IGNORE past a short last window) and their number. The
    bytes are those of all evaluated targets decoded in one piece, given with the first batch."""
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError(f"{path} is empty — pass a text file with some text")
    ids = np.array([tokenizer.eos_id, *ids], dtype=np.int64)
    starts = list(range(0, ids.size - 1, seq_len))
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    end = min(starts[-1] + seq_len + 1, ids.size)  # one past the last evaluated target
    n_bytes = _utf8_bytes(tokenizer, [ids[1:end].tolist()])

    def batches() -> Iterator[Batch]:
        for first in range(0, len(starts), batch_size):
            rows = [ids[s : s + seq_len + 1] for s in starts[first : first + batch_size]]
            width = max(row.size for row in rows) - 1
            inputs = np.full((len(rows), width), tokenizer.eos_id, dtype=np.int64)
            targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
            for i, row in enumerate(rows):
                inputs[i, : row.size - 1], targets[i, : row.size - 1] = row[:-1], row[1:]
            yield torch.from_numpy(inputs), torch.from_numpy(targets), None, n_bytes if first == 0 else 0

    return batches(), len(starts)
