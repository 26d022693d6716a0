"""End to end: `zili train --metrics.tensorboard=true` writes TensorBoard event files holding metrics.jsonl's
numbers (read back with TensorBoard's own reader), and `zili report` draws the run."""

import re

import pytest

from tests.conftest import TINY_MODEL
from tests.unit.test_report import jsonl_scalars, tensorboard_scalars
from zili.cli import main


def test_trained_run_has_tensorboard_scalars_and_a_report(zili_cli, tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    zili_cli("train", *TINY_MODEL, f"--data.dataset={tiny_dataset}", "--training.steps=4", "--metrics.log_every=2",
             "--training.eval_every=4", "--metrics.tensorboard=true", f"--training.run_dir={run}", check=True)
    expected = jsonl_scalars(run)
    contract = {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "skipped_steps"}  # mfu: not
    # when this CPU's peak could not be measured (an oversubscribed host)
    assert contract <= set(expected)
    got = tensorboard_scalars(run / "tensorboard")
    assert sorted(got) == sorted(expected)
    for tag, by_step in expected.items():
        assert got[tag] == pytest.approx(by_step, rel=1e-6), tag
    assert sorted(got["val_loss"]) == [0, 4] and sorted(got["loss"]) == [2, 4]

    main(["report", str(run)])  # in this process: the CLI's parsing and the report, without a second start-up
    html = (run / "report" / "index.html").read_text()
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert set(re.findall(r'<img src="([^"]+)"', html)) == pngs and {"loss.png", "lr.png", "tokens_per_s.png"} <= pngs
