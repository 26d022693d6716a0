"""Every parallel layout trains exactly like one process: the first 20 losses (fp32, same global batch)
equal a single-process run within 1e-4 relative, and so do the validation losses at steps 0, 10, 20."""

from __future__ import annotations

import pytest

from tests.distributed.conftest import PARITY, assert_losses_match, check_ok, read_records

SLOW = pytest.mark.slow  # left out of the default run (`make test-slow`), to keep it under 10 minutes

LAYOUTS = [
    # (ranks, layers, layout overrides); plain FSDP2 over 2 ranks is test_torchrun_launch_fsdp2_matches_single_process
    pytest.param(2, 2, ["--parallelism.dp_shard=2", "--training.micro_batch_size=2"], id="fsdp2-accumulating"),
    pytest.param(2, 2, ["--parallelism.dp_replicate=2", "--parallelism.dp_shard=1"], id="hsdp-replicate2", marks=SLOW),
    pytest.param(2, 2, ["--parallelism.tp=2"], id="tp2-sequence-parallel"),
    pytest.param(2, 2, ["--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"], id="pp2-1f1b"),
    pytest.param(2, 4, ["--parallelism.pp=2", "--parallelism.pp_schedule=Interleaved1F1B"], id="pp2-interleaved1f1b"),
    pytest.param(2, 4, ["--parallelism.pp=2", "--parallelism.pp_schedule=InterleavedZeroBubble"], id="pp2-zero-bubble",
                 marks=SLOW),
    pytest.param(4, 2, ["--parallelism.dp_replicate=2", "--parallelism.dp_shard=2"], id="hsdp-2x2", marks=SLOW),
    pytest.param(4, 4, ["--parallelism.dp_shard=2", "--parallelism.tp=2"], id="fsdp2-x-tp2", marks=SLOW),
    # context parallelism: each sequence of 32 tokens in 4 chunks, 2 per rank (zili/parallel/context_parallel.py)
    pytest.param(2, 2, ["--parallelism.cp=2", "--parallelism.dp_shard=1"], id="cp2"),
    pytest.param(4, 2, ["--parallelism.cp=2", "--parallelism.tp=2", "--parallelism.dp_shard=1"], id="cp2-x-tp2",
                 marks=SLOW),
    pytest.param(4, 2, ["--parallelism.cp=2", "--parallelism.dp_shard=2"], id="cp2-x-fsdp2", marks=SLOW),
    # 8 processes on a 2-core machine are slow: the first 5 of the 20 steps (exit_after) suffice here
    pytest.param(8, 4, ["--parallelism.pp=2", "--parallelism.dp_shard=2", "--parallelism.tp=2",
                        "--training.exit_after=5"], id="pp2-x-fsdp2-x-tp2", marks=SLOW),
]


def check_parity(records: dict[int, dict], reference: dict[int, dict], last: int = 20) -> None:
    assert sorted(records) == list(range(last + 1))
    assert_losses_match(reference, records, range(last + 1))
    # the same global batches were consumed, and the logged figures are global ones
    assert all(records[s]["sequence_ids"] == reference[s]["sequence_ids"] for s in range(1, last + 1))
    assert len(records[1]["sequence_ids"]) == 8
    assert abs(records[last]["grad_norm"] - reference[last]["grad_norm"]) <= 1e-3 * reference[last]["grad_norm"]


@pytest.mark.parametrize("ranks,layers,layout", LAYOUTS)
def test_layout_matches_single_process(zili_ranks, tiny_dataset, reference_runs, tmp_path, ranks, layers, layout):
    run_dir = tmp_path / "run"
    check_ok(zili_ranks(ranks, *PARITY, f"--data.dataset={tiny_dataset}", f"--model.n_layers={layers}",
                        f"--training.run_dir={run_dir}", *layout))
    check_parity(read_records(run_dir), reference_runs[layers], 5 if "--training.exit_after=5" in layout else 20)


def test_torchrun_launch_fsdp2_matches_single_process(zili_torchrun, tiny_dataset, reference_runs, tmp_path):
    """The documented launch: torchrun starts the ranks, `python -m zili` joins them with gloo from the
    environment, and dp_shard=-1 (the default) takes both as FSDP2. Without training.run_dir the ranks agree
    on rank 0's runs/<timestamp> directory."""
    proc = zili_torchrun(2, *PARITY, f"--data.dataset={tiny_dataset}", "--model.n_layers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    assert [p.name for p in (run_dirs[0] / "checkpoints").iterdir()] == ["step-0000020"]
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints
    check_parity(read_records(run_dirs[0]), reference_runs[2])
