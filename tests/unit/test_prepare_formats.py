"""zili data prepare over published forms of data: gzip/zstd JSONL and text, Parquet, directories mixing them,
tokenized in worker processes — the same shards as from plain JSONL, and one-line errors for bad input."""

import gzip
import json
import multiprocessing
import random
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from zili.cli import main
from zili.data import prepare as prepare_module
from zili.data import workers as workers_module
from zili.data.prepare import prepare
from zili.data.tokenizer import Tokenizer, train_bpe
from zili.errors import UserError

WORDS = ["winter", "discontent", "summer", "sun", "York", "clouds", "house", "ocean", "café", "naïve", "über",
         "—", "日本", "tokens", "shard", "\n", "\r\n", "  ", "42", "!"]


def _corpus(n: int, seed: int = 0) -> list[str]:
    """n documents of 0-60 words (some empty, which prepare drops), with non-ASCII and "\\r" inside."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 60))) for _ in range(n)]


DOCS = _corpus(60)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_bpe(DOCS, 300).save(path)
    return path


def _jsonl(docs, key="text") -> bytes:
    return "".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(docs)).encode()


def _gzip(data: bytes) -> bytes:
    """Two gzip members, as `cat a.gz b.gz` makes: readers must go on past the first."""
    half = len(data) // 2
    return gzip.compress(data[:half]) + gzip.compress(data[half:])


def _zstd(data: bytes) -> bytes:
    """Two zstd frames, as parallel compressors (pzstd, zstd -T) write."""
    half = len(data) // 2
    compressor = zstandard.ZstdCompressor()
    return compressor.compress(data[:half]) + compressor.compress(data[half:])


def _parquet(path, docs, row_group_size=7, **columns):
    table = pa.table({"id": list(range(len(docs))), "text": docs, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)


def _dataset(directory) -> tuple[dict, dict[str, bytes]]:
    """(manifest, shard file name -> bytes) of a prepared dataset."""
    manifest = json.loads((directory / "manifest.json").read_text())
    return manifest, {s["file"]: (directory / s["file"]).read_bytes() for s in manifest["shards"]}


def _no_leftovers(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary dataset directory left


def test_every_format_and_a_mixed_directory_give_the_plain_jsonl_shards(tok_dir, tmp_path):
    (tmp_path / "plain.jsonl").write_bytes(_jsonl(DOCS))
    (tmp_path / "docs.jsonl.gz").write_bytes(_gzip(_jsonl(DOCS)))
    (tmp_path / "docs.jsonl.zst").write_bytes(_zstd(_jsonl(DOCS)))
    _parquet(tmp_path / "docs.parquet", DOCS)
    assert pq.ParquetFile(tmp_path / "docs.parquet").num_row_groups == 9
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    # sorted path order: a.jsonl.gz, b.parquet, sub/c.jsonl.zst, sub/d.jsonl
    (mixed / "sub" / "d.jsonl").write_bytes(_jsonl(DOCS[45:]))
    (mixed / "sub" / "c.jsonl.zst").write_bytes(_zstd(_jsonl(DOCS[30:45])))
    _parquet(mixed / "b.parquet", DOCS[10:30], row_group_size=6)
    (mixed / "a.jsonl.gz").write_bytes(_gzip(_jsonl(DOCS[:10])))

    expected = _dataset_of(tmp_path / "plain.jsonl", tok_dir, tmp_path / "out-plain")
    tokenizer = Tokenizer.load(tok_dir)
    manifest, shards = expected
    tokens = np.concatenate([np.frombuffer(b, dtype=manifest["dtype"]) for b in shards.values()]).tolist()
    assert tokens == [t for d in DOCS if d for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert len(shards) > 3
    for name in ["docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet", "mixed"]:
        assert _dataset_of(tmp_path / name, tok_dir, tmp_path / f"out-{name}") == expected, name


def _dataset_of(source, tok_dir, out, **kwargs):
    prepare([source], tok_dir, out, shard_tokens=256, **kwargs)
    return _dataset(out)


def test_compressed_text_files_read_like_plain_ones(tok_dir, tmp_path):
    text = "ROMEO:\r\nBut soft, what light through yonder window breaks?\r\nIt is the east — café\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "play.txt").write_bytes(text.encode())
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "play.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "packed" / "play.zst").write_bytes(_zstd(text.encode()))
    plain = _dataset_of(tmp_path / "plain", tok_dir, tmp_path / "out-plain")
    packed = _dataset_of(tmp_path / "packed", tok_dir, tmp_path / "out-packed")
    assert packed[0]["documents"] == 2 and plain[0]["documents"] == 1
    plain_tokens = np.frombuffer(b"".join(plain[1].values()), dtype=plain[0]["dtype"])
    packed_tokens = np.frombuffer(b"".join(packed[1].values()), dtype=packed[0]["dtype"])
    assert packed_tokens.tolist() == plain_tokens.tolist() * 2  # "\r\n" made "\n" alike


@pytest.fixture
def slow_here(monkeypatch) -> list[int]:
    """Small batches (~130 for 400 documents), and those tokenized in this process while the workers start
    made slow (0.1 s), so that most go to the workers; returns the sizes of those tokenized here."""
    monkeypatch.setattr(prepare_module, "POOL_BATCH_CHARS", 500)
    here, tokenize = [], workers_module.tokenize

    def slowly_here(texts, tokenizer):
        here.append(len(texts))
        time.sleep(0.1)
        return tokenize(texts, tokenizer)

    # the workers run their own copy of the module: this slows only the batches tokenized in this process
    monkeypatch.setattr(workers_module, "tokenize", slowly_here)
    return here


def test_workers_give_byte_identical_output(tok_dir, tmp_path, slow_here):
    docs = _corpus(400, seed=1)
    (tmp_path / "docs.jsonl").write_bytes(_jsonl(docs))
    one = _dataset_of(tmp_path / "docs.jsonl", tok_dir, tmp_path / "out-1", workers=1)
    two = _dataset_of(tmp_path / "docs.jsonl", tok_dir, tmp_path / "out-2", workers=2)
    assert two == one and one[0]["documents"] == sum(1 for d in docs if d)
    assert len(slow_here) < 40  # the workers tokenized the other 90+ batches, in order
    assert multiprocessing.active_children() == []  # and are gone


def test_a_bad_line_with_workers_is_one_user_error_and_leaves_nothing(tok_dir, tmp_path, slow_here):
    lines = _jsonl(_corpus(400, seed=2)).decode().splitlines(keepends=True)
    lines[350] = '{"text": "cut off\n'  # read when the workers have batches in flight
    (tmp_path / "docs.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"docs\.jsonl:351 is not valid JSON"):
        prepare([tmp_path / "docs.jsonl"], tok_dir, out, workers=2)
    _no_leftovers(tmp_path, out)
    assert multiprocessing.active_children() == []  # the workers were stopped


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


BAD_INPUTS = {
    "truncated gzip": ("a.jsonl.gz", lambda p: p.write_bytes(_truncated(gzip.compress(_jsonl(DOCS)))),
                       "a.jsonl.gz is not a valid gzip file or is truncated (near line"),
    "not gzip": ("a.txt.gz", lambda p: p.write_bytes(b"plain text, not gzip"),
                 "a.txt.gz is not a valid gzip file or is truncated"),
    "truncated zstd": ("a.jsonl.zst", lambda p: p.write_bytes(_truncated(_zstd(_jsonl(DOCS)))),
                       "a.jsonl.zst is not a valid zstd file or is truncated (near line"),
    "corrupt zstd": ("a.zst", lambda p: p.write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 40),
                     "a.zst is not a valid zstd file or is truncated"),
    "not parquet": ("a.parquet", lambda p: p.write_bytes(_jsonl(DOCS)), "a.parquet is not a readable Parquet file"),
    "truncated parquet": ("a.parquet", lambda p: (_parquet(p, DOCS), p.write_bytes(_truncated(p.read_bytes()))),
                          "a.parquet is not a readable Parquet file"),
    "no text column": ("a.parquet", lambda p: pq.write_table(pa.table({"id": [1], "body": ["x"]}), p),
                       "a.parquet has no column 'text' (its columns: 'id', 'body')"),
    "int column": ("a.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
                   "a.parquet row 0: field 'text' is int, not a string"),
    "null row": ("a.parquet", lambda p: _parquet(p, ["a", "b", None, "d"], row_group_size=2),
                 "a.parquet row 2: field 'text' is null, not a string"),
    "not utf-8 in zstd": ("a.zst", lambda p: p.write_bytes(_zstd("café".encode("latin-1"))),
                          "a.zst is not UTF-8 text (byte 3 of the decompressed text)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_user_error_naming_the_file(tok_dir, tmp_path, case):
    name, write, fragment = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / name)
    out = tmp_path / "out"
    with pytest.raises(UserError) as error:
        prepare([tmp_path / "in"], tok_dir, out)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize("name, module", [("a.jsonl.zst", "zstandard"), ("a.parquet", "pyarrow.parquet")])
def test_a_missing_optional_package_says_what_to_install(tok_dir, tmp_path, monkeypatch, capsys, name, module):
    (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", "--input", str(tmp_path / name), "--tokenizer", str(tok_dir),
              "--output", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert f"{name} needs the '{module.split('.')[0]}' package" in err and "pip install 'zili[data]'" in err
    _no_leftovers(tmp_path, tmp_path / "out")
