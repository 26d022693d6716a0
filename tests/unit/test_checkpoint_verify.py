"""Verified checkpoints: a manifest written last, damage found and skipped with one warning, checkpoints from before
manifests used unverified, a full disk leaving the earlier checkpoints intact, retention that never counts a damaged
checkpoint, and the data a checkpoint was trained on checked on resume."""

import errno
import json
import os
import re

import pytest
import torch

from zili import checkpoint
from zili.checkpoint import manifest as checkpoint_manifest
from zili.config import OptimizerConfig
from zili.data.manifest import fingerprint
from zili.errors import UserError
from zili.models.args import ModelArgs
from zili.models.transformer import Transformer
from zili.train.optim import build_optimizer

ARGS = dict(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=40, max_seq_len=8)


@pytest.fixture(scope="module")
def model_and_optimizer():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    model.init_weights(0)
    opt = build_optimizer(model, OptimizerConfig(), "cpu")
    model(torch.randint(0, 40, (2, 8))).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def save(tmp_path, model_and_optimizer):
    model, opt = model_and_optimizer

    def write(step, keep=5):
        return checkpoint.save(tmp_path, step, [model], [opt], {"step": torch.tensor(step)},
                               {"model": model.args.to_dict()}, keep=keep)

    return write


def names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path, save):
    path = save(1)
    manifest = json.loads((path / "manifest.json").read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert {".metadata", "meta.json", "__0_0.distcp"} <= set(listed)
    assert set(listed) == set(checkpoint_manifest.data_files(path))  # all of them, no part file left
    for name, entry in listed.items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert entry == checkpoint_manifest.describe(path, name)
    assert checkpoint.read_meta(path)["manifest"] == "manifest.json"
    assert checkpoint.verify(path).describe() == "step-0000001: ok"
    assert names(tmp_path) == ["step-0000001"]


def truncate(path):
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-7])


def flip(path):
    data = path / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))


DAMAGE = {
    "truncated": (truncate, r"__0_0.distcp: size \d+ != \d+"),
    "flipped byte": (flip, "__0_0.distcp: checksum mismatch"),
    "deleted file": (lambda p: (p / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "deleted manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    "garbled manifest": (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
    "deleted metadata": (lambda p: (p / ".metadata").unlink(), ".metadata is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_skipped_with_one_warning(tmp_path, save, capsys, damage):
    save(1)
    newest = save(2)
    harm, problem = DAMAGE[damage]
    harm(newest)
    verdict = checkpoint.verify(newest)
    assert not verdict.usable and re.search(problem, verdict.problem or "")
    capsys.readouterr()
    assert checkpoint.resolve(tmp_path).name == "step-0000001"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint {newest} is damaged (")
    assert warning[0].endswith("— skipped; using step-0000001")
    assert checkpoint.latest(tmp_path).name == "step-0000001"
    with pytest.raises(UserError, match="step-0000002 is damaged .* pick another step"):
        checkpoint.resolve(tmp_path, 2)  # a step asked for is never silently replaced
    with pytest.raises(UserError, match="step-0000002 is damaged .* --checkpoint.resume=auto"):
        checkpoint.require_usable(newest)


def test_no_intact_checkpoint_is_one_user_error(tmp_path, save):
    for step in (1, 2):
        flip(save(step))
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step-0000002: __0_0.distcp: checksum mismatch.*"
                                        r"step-0000001: .* start a new run_dir"):
        checkpoint.latest(tmp_path)
    assert checkpoint.latest(tmp_path / "elsewhere") is None  # no checkpoint at all: start fresh


def test_checkpoint_from_before_manifests_is_used_unverified(tmp_path, save, capsys):
    path = save(3)
    (path / "manifest.json").unlink()
    meta = checkpoint.read_meta(path)
    del meta["manifest"]
    (path / "meta.json").write_text(json.dumps(meta))
    verdict = checkpoint.verify(path)
    assert verdict.usable and not verdict.verified and "unverified" in verdict.describe()
    capsys.readouterr()
    assert checkpoint.resolve(tmp_path) == path
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no manifest.json (written before zili checked checkpoints)" in err[0]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def eio(*args, **kwargs):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize("phase", ["data files", "manifest"])
def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, save, monkeypatch, phase):
    save(1)
    if phase == "data files":
        monkeypatch.setattr(os, "fsync", enospc)  # DCP fsyncs each file it writes: ENOSPC shows there
    else:
        monkeypatch.setattr(checkpoint_manifest, "write", enospc)
    with pytest.raises(UserError) as caught:
        save(2, keep=1)
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing checkpoint step 2 to {tmp_path / 'checkpoints'} — "
                              "free space there")
    assert message.endswith("the previous checkpoint step-0000001 is intact") and "\n" not in message
    monkeypatch.undo()
    assert names(tmp_path) == ["step-0000001"]  # no temporary directory left, nothing deleted
    assert checkpoint.verify(checkpoint.resolve(tmp_path)).describe() == "step-0000001: ok"


def test_other_io_errors_are_user_errors_too(tmp_path, save, monkeypatch):
    monkeypatch.setattr(checkpoint_manifest, "write", eio)
    with pytest.raises(UserError, match="writing checkpoint step 1 .* failed .*Input/output error.*no earlier "
                                        "checkpoint exists"):
        save(1)
    assert names(tmp_path) == []


def test_retention_never_counts_a_damaged_checkpoint(tmp_path, save):
    save(1)
    truncate(save(2))
    save(3, keep=2)  # step 2 is damaged: step 1 stays as the second intact one
    assert names(tmp_path) == ["step-0000001", "step-0000002", "step-0000003"]
    save(4, keep=2)
    assert names(tmp_path) == ["step-0000003", "step-0000004"]
    save(5, keep=1)
    assert names(tmp_path) == ["step-0000005"]


def test_retention_keeps_the_checkpoint_just_written_and_leaves_newer_ones(tmp_path, save):
    for step in (1, 2, 3):
        save(step)
    flip(tmp_path / "checkpoints" / "step-0000003")  # a resume went back to step 2 past the damaged step 3 ...
    save(2, keep=1)  # ... and wrote step 2 again
    assert names(tmp_path) == ["step-0000002", "step-0000003"]
    assert checkpoint.latest(tmp_path).name == "step-0000002"


def test_dataset_fingerprint_follows_the_content_not_the_place():
    manifest = {"format": 1, "dtype": "uint16", "vocab_size": 512, "eos_id": 0, "total_tokens": 10, "documents": 1,
                "shards": [{"file": "shard-00000.bin", "tokens": 10, "sha256": "ab" * 32}], "tokenizer": "tokenizer"}
    same = {**manifest, "tokenizer": "elsewhere", "documents": 1}
    other = {**manifest, "shards": [{**manifest["shards"][0], "sha256": "cd" * 32}]}
    assert fingerprint(manifest) == fingerprint(same) != fingerprint(other)
    assert len(fingerprint(manifest)) == 32


def test_resume_on_other_data_is_refused(tmp_path, model_and_optimizer):
    model, opt = model_and_optimizer
    data = {"dataset": "a" * 32, "path": "/data/one", "seq_len": 32, "val_fraction": 0.01, "seed": 1, "batch_size": 4}
    path = checkpoint.save(tmp_path, 1, [model], [opt], {}, {"data": data}, keep=1)
    checkpoint.check_same_data(path, {**data, "path": "/moved/one", "batch_size": 8})  # moved, other batch: fine
    checkpoint.check_same_data(path, None)  # no token dataset (grpo)
    with pytest.raises(UserError, match=r"trained on other data: training.seq_len=64 \(it trained with 32\), "
                                        r"data.val_fraction=0.1 \(it trained with 0.01\) — resume with the original"):
        checkpoint.check_same_data(path, {**data, "seq_len": 64, "val_fraction": 0.1})
    with pytest.raises(UserError, match=r"data.dataset /data/two \(it trained on /data/one; content aaaaaaaaaaaa "
                                        r"then, bbbbbbbbbbbb now\) — .* or start a new run_dir"):
        checkpoint.check_same_data(path, {**data, "dataset": "b" * 32, "path": "/data/two"})
    with pytest.raises(UserError, match=r"data.dataset /data/one \(content aaaa"):
        checkpoint.check_same_data(path, {**data, "dataset": "b" * 32})  # prepared again in place
    old = checkpoint.save(tmp_path / "old", 1, [model], [opt], {}, {}, keep=1)
    checkpoint.check_same_data(old, {**data, "seq_len": 64})  # from before the data was recorded: not checked
