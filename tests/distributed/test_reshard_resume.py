"""Checkpoints reshard: save under one layout after step 10, resume under another, and steps 11-20 equal an
uninterrupted single-process run (loss within 1e-4 relative) while consuming exactly the same sequences."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import PARITY, assert_losses_match, check_ok, read_records

CASES = [
    # (ranks, layout) before -> (ranks, layout) after
    pytest.param((2, ["--parallelism.dp_shard=2"]), (1, []), id="fsdp2-to-1"),
    pytest.param((1, []), (2, ["--parallelism.dp_shard=2"]), id="1-to-fsdp2", marks=pytest.mark.slow),
    pytest.param((2, ["--parallelism.tp=2"]), (2, ["--parallelism.dp_shard=2"]), id="tp2-to-fsdp2",
                 marks=pytest.mark.slow),
    pytest.param((2, ["--parallelism.pp=2", "--parallelism.pp_schedule=Interleaved1F1B"]),
                 (2, ["--parallelism.tp=2"]), id="pp2-interleaved-to-tp2", marks=pytest.mark.slow),
    pytest.param((2, ["--parallelism.cp=2", "--parallelism.dp_shard=1"]), (1, []), id="cp2-to-1",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("before,after", CASES)
def test_resume_under_another_layout(zili_ranks, zili_cli, tiny_dataset, reference_runs, tmp_path, before, after):
    run_dir = tmp_path / "run"
    common = [*PARITY, f"--data.dataset={tiny_dataset}", "--model.n_layers=4", f"--training.run_dir={run_dir}"]

    def train(ranks, layout, *extra):
        if ranks == 1:
            proc = zili_cli("train", *common, *layout, *extra)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout
        results = zili_ranks(ranks, *common, *layout, *extra)
        check_ok(results)
        return results[0].stdout

    train(*before, "--training.exit_after=10")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000010"]
    out = train(*after, "--checkpoint.resume=auto")
    assert "resumed from" in out and "at step 10" in out
    records, reference = read_records(run_dir), reference_runs[4]
    assert sorted(records) == list(range(21))
    assert_losses_match(reference, records, range(11, 21))
    assert all(records[s]["sequence_ids"] == reference[s]["sequence_ids"] for s in range(1, 21))
    consumed = [i for s in range(1, 21) for i in records[s]["sequence_ids"]]
    assert len(set(consumed)) == len(consumed) == 160  # nothing skipped or repeated within the epoch
