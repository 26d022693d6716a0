"""zili.data.prepare: documents -> shards + manifest, dtype choice, checksums, errors, atomic output."""

import hashlib
import json

import numpy as np
import pytest

from zili.data.prepare import prepare
from zili.data.shards import ShardWriter, token_dtype
from zili.data.tokenizer import Tokenizer, train_bpe
from zili.errors import UserError

DOCS = ["Now is the winter of our discontent\n", "Made glorious summer by this sun of York;\n",
        "And all the clouds that lour'd upon our house\n"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_bpe(DOCS * 3, 300).save(path)
    return path


def _tokens(directory, manifest):
    return np.concatenate([np.fromfile(directory / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]])


def _expected(tokenizer, docs):
    return [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_text_files_and_directories_become_checked_shards(tok_dir, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text(DOCS[1])
    (corpus / "a.md").write_text(DOCS[0])
    (corpus / "sub" / "c.txt").write_text(DOCS[2])
    (corpus / "empty.txt").write_text("")
    (corpus / ".hidden").write_text("never read")
    out = tmp_path / "out"
    manifest = prepare([corpus], tok_dir, out, shard_tokens=16)

    tokenizer = Tokenizer.load(tok_dir)
    expected = _expected(tokenizer, [DOCS[0], DOCS[1], DOCS[2]])  # sorted walk: a.md, b.txt, sub/c.txt
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["dtype"] == "uint16" and manifest["documents"] == 3
    assert (manifest["vocab_size"], manifest["eos_id"]) == (tokenizer.vocab_size, tokenizer.eos_id)
    assert manifest["total_tokens"] == len(expected)
    assert _tokens(out, manifest).tolist() == expected
    assert len(manifest["shards"]) == -(-len(expected) // 16)
    for i, shard in enumerate(manifest["shards"]):
        data = (out / shard["file"]).read_bytes()
        assert shard["file"] == f"shard-{i:05d}.bin" and shard["tokens"] <= 16
        assert len(data) == 2 * shard["tokens"] and shard["sha256"] == hashlib.sha256(data).hexdigest()
    copied = Tokenizer.load(out / manifest["tokenizer"])
    assert copied.encode(DOCS[2]) == tokenizer.encode(DOCS[2])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_jsonl_documents_come_from_text_key(tok_dir, tmp_path):
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)]
    (tmp_path / "docs.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    manifest = prepare([tmp_path / "docs.jsonl"], tok_dir, tmp_path / "out", text_key="body")
    assert manifest["documents"] == 3
    assert _tokens(tmp_path / "out", manifest).tolist() == _expected(Tokenizer.load(tok_dir), DOCS)


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    writer = ShardWriter(tmp_path, token_dtype(70000), shard_tokens=3)
    writer.write(np.array([1, 65536, 69999, 7]))
    shards = writer.close()
    assert [s["tokens"] for s in shards] == [3, 1]
    assert np.fromfile(tmp_path / shards[0]["file"], dtype="<u4").tolist() == [1, 65536, 69999]


def test_large_vocab_prepares_uint32(tmp_path):
    tokenizer = train_bpe(DOCS, 300)
    tokenizer.backend.add_tokens([f"<w{i}>" for i in range(66000)])
    tokenizer.save(tmp_path / "tok")
    (tmp_path / "doc.txt").write_text("the <w65999> winter")
    manifest = prepare([tmp_path / "doc.txt"], tmp_path / "tok", tmp_path / "out")
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] > 65536
    tokens = _tokens(tmp_path / "out", manifest)
    assert tokenizer.backend.token_to_id("<w65999>") in tokens.tolist() and tokens.max() > 65535


def test_output_may_exist_if_empty(tok_dir, tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "out").mkdir()
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing input", "does not exist"),
    ("no files", "is empty"),
    ("only empty files", "is empty"),
    ("bad json", r"bad\.jsonl:2 is not valid JSON"),
    ("missing key", r"bad\.jsonl:2 has no field 'text'"),
    ("not utf-8", "not UTF-8"),
    ("output not empty", "pick another directory or delete it"),
])
def test_user_errors(tok_dir, tmp_path, case, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    out = tmp_path / "out"
    if case == "only empty files":
        (corpus / "a.txt").write_text("")
    elif case == "bad json":
        (corpus / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    elif case == "missing key":
        (corpus / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    elif case == "not utf-8":
        (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    elif case == "output not empty":
        (corpus / "a.txt").write_text(DOCS[0])
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    inputs = [tmp_path / "missing"] if case == "missing input" else [corpus]
    with pytest.raises(UserError, match=message):
        prepare(inputs, tok_dir, out)
    if case == "output not empty":
        assert (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
