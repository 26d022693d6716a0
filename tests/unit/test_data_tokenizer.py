"""zili.data.tokenizer: byte-level BPE training, exact round trips, save/load, transformers compatibility."""

import json

import pytest

from zili.data.tokenizer import EOS, Tokenizer, train_bpe
from zili.errors import UserError

CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n",
] * 5

TRICKY = "  Leading spaces,\ttabs\r\nCRLF, naïve café, 中文, emoji 🤖, trailing  \n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, 320)


def test_round_trip_is_exact(tokenizer):
    for text in [TRICKY, CORPUS[0], "", " ", "x" * 1000]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_merges_learned_and_no_special_tokens_added(tokenizer):
    ids = tokenizer.encode("to be")
    assert len(ids) < len("to be")  # merges happened
    assert tokenizer.eos_id not in ids and tokenizer.encode("") == []
    assert tokenizer.eos_id == tokenizer.backend.token_to_id(EOS)
    assert tokenizer.vocab_size == 320  # counts the special token
    assert max(max(tokenizer.encode(t)) for t in CORPUS + [TRICKY]) < tokenizer.vocab_size


def test_encode_batch_matches_encode(tokenizer):
    texts = CORPUS[:3] + [TRICKY, ""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_save_then_load_gives_same_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.encode(TRICKY) == tokenizer.encode(TRICKY)
    assert (loaded.vocab_size, loaded.eos_id) == (tokenizer.vocab_size, tokenizer.eos_id)


def test_transformers_auto_tokenizer_reads_saved_directory(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [TRICKY, CORPUS[1]]:
        assert auto(text)["input_ids"] == tokenizer.encode(text)  # no BOS/EOS added
    assert auto.eos_token == EOS and auto.eos_token_id == tokenizer.eos_id
    assert auto.decode(tokenizer.encode(TRICKY)) == TRICKY


def test_load_missing_directory_names_it(tmp_path):
    with pytest.raises(UserError, match="nothere"):
        Tokenizer.load(tmp_path / "nothere")


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="at least 257"):
        train_bpe(CORPUS, 100)


def test_eos_comes_from_tokenizer_config_when_present(tmp_path):
    tokenizer = train_bpe(CORPUS, 300)
    tokenizer.backend.add_special_tokens(["</s>"])
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert Tokenizer.load(tmp_path).eos_id == tokenizer.backend.token_to_id("</s>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(UserError, match="<nope>"):
        Tokenizer.load(tmp_path)
