"""A layout (or device choice) that cannot work stops every rank with exit code 2 and one line from rank 0,
before training."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MODEL

SLOW = pytest.mark.slow  # the rule itself is also checked in-process: tests/unit/test_parallel_layout.py

BAD = [
    pytest.param(2, ["--parallelism.dp_shard=1", "--parallelism.tp=1"], "needs 1 processes but 2 were started",
                 id="product-not-world-size"),
    pytest.param(2, ["--parallelism.tp=2", "--model.n_heads=4", "--model.n_kv_heads=1"],
                 "tp=2 does not divide the model's n_kv_heads (1)", id="tp-not-dividing-kv-heads", marks=SLOW),
    pytest.param(2, ["--parallelism.pp=2", "--parallelism.pp_schedule=Interleaved1F1B", "--model.n_layers=3",
                     "--model.tied_embeddings=false"], "makes 4 pipeline stages but the model has 3 layers",
                 id="pp-stages-above-layers", marks=SLOW),
    pytest.param(1, ["--parallelism.tp=2"], "needs 2 processes but this is a single process", id="single-process-tp2"),
    pytest.param(2, ["--training.device=cpu:0"], "names one device for every rank", id="one-device-for-all-ranks"),
    pytest.param(2, ["--parallelism.fsdp_cpu_offload=true"], "on the CPU already", id="cpu-offload-on-cpu"),
    pytest.param(2, ["--parallelism.cp=2", "--training.seq_len=34"], "seq_len 34 is not a multiple of 4",
                 id="cp-not-dividing-the-chunked-sequence", marks=SLOW),
    pytest.param(2, ["--parallelism.cp=2", "--model.mtp_depth=1"], "context parallelism has no path for multi-token",
                 id="cp-with-multi-token-prediction", marks=SLOW),
]
BAD += [  # the other expert-parallel rules: tests/unit/test_parallel_layout.py
    pytest.param(2, ["--model.preset=tiny-moe", "--parallelism.ep=4"], "ep=4 must divide dp_shard*cp = 2",
                 id="ep-above-data-ranks", marks=SLOW),
    pytest.param(2, ["--model.preset=tiny-moe", "--parallelism.cp=2", "--parallelism.dp_shard=1",
                     "--moe.aux_loss_coef=0.001"], "moe.aux_loss_coef > 0 with cp > 1", id="cp-with-balance-loss"),
]


@pytest.mark.parametrize("ranks,layout,message", BAD)
def test_bad_layout_one_line_exit_2(zili_ranks, tiny_dataset, tmp_path, ranks, layout, message):
    results = zili_ranks(ranks, *TINY_MODEL, f"--data.dataset={tiny_dataset}", f"--training.run_dir={tmp_path / 'run'}",
                         *layout)
    assert [r.returncode for r in results] == [2] * ranks
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], results[0].stderr
    assert "Traceback" not in "".join(r.stderr for r in results)
    assert all(r.stderr.strip() == "" for r in results[1:])  # the other ranks say nothing
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
