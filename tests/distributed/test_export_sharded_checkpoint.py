"""Exporting a checkpoint written by 2 ranks (FSDP shards) gives the same files as exporting the same
weights written by 1 rank."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MODEL
from tests.distributed.conftest import check_ok
from zili import checkpoint
from zili.infer.run import load_run
from zili.interop.export_hf import export_hf

pytest.importorskip("transformers")


def test_two_rank_checkpoint_exports_like_one_rank(zili_ranks, tiny_dataset, tmp_path):
    sharded = tmp_path / "sharded"
    check_ok(zili_ranks(2, *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=3",
                        "--parallelism.dp_shard=2", f"--training.run_dir={sharded}"))
    path = checkpoint.resolve(sharded)
    assert len(list(path.glob("*.distcp"))) == 2  # both ranks wrote shards
    # the same weights, written by one process
    model, _ = load_run(sharded, device="cpu")
    single = tmp_path / "single"
    checkpoint.save_model(single, 3, model, checkpoint.read_meta(path))
    (single / "tokenizer").symlink_to(sharded / "tokenizer")
    assert len(list(checkpoint.resolve(single).glob("*.distcp"))) == 1
    a, b = export_hf(sharded, tmp_path / "out-sharded"), export_hf(single, tmp_path / "out-single")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
