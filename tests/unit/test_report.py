"""`zili report` on hand-written run directories (metrics.jsonl + config.toml), and metrics.tensorboard's event
files read back with TensorBoard's own reader. The end-to-end path (a real training run) is in
tests/e2e/test_report.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from matplotlib.image import imread

from zili.cli import main
from zili.config import Config
from zili.errors import UserError
from zili.report import write_report
from zili.report.charts import CHARTS, draw
from zili.report.runs import load_runs
from zili.train.metrics import MetricsLog, read_metrics


def make_run(path, lr: float, steps: int = 10, extra: dict | None = None, keys=None):
    """A run directory as `zili train` leaves it, minus checkpoints: config.toml and metrics.jsonl (step 0 the
    untrained model's validation, then every 2 steps, validated every 4). `keys`: the training fields kept
    (default all; fewer charts draw faster)."""
    path.mkdir(parents=True)
    cfg = Config()
    cfg.optimizer.lr, cfg.training.run_dir, cfg.training.steps = lr, str(path), steps
    (path / "config.toml").write_text(cfg.to_toml())
    records = [{"step": 0, "loss": None, "lr": None, "grad_norm": None, "tokens_per_s": None, "mfu": None,
                "peak_mem_gb": None, "skipped_steps": None, "val_loss": 6.2}]
    for step in range(2, steps + 1, 2):
        record = {"step": step, "loss": 6.0 - step * lr * 10, "lr": lr * step / steps, "grad_norm": 1.0 + step / 100,
                  "tokens_per_s": 1000.0 + step, "mfu": 0.25, "peak_mem_gb": 1.5, "skipped_steps": 0}
        record = {k: v for k, v in record.items() if keys is None or k in keys or k == "step"}
        if step % 4 == 0:
            record["val_loss"] = 6.1 - step * lr * 10
        records.append({**record, **(extra or {})})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def image_sources(html: str) -> set[str]:
    return set(re.findall(r'<img src="([^"]+)"', html))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs and their report (drawing its charts takes the time: written once for the tests below)."""
    root = tmp_path_factory.mktemp("two-runs")
    a = make_run(root / "base", 1e-3)
    b = make_run(root / "high-lr", 3e-3, extra={"expert_load": 1.25})
    return a, b, write_report([a, b], root / "out")


def test_report_of_two_runs_overlays_them_and_compares_configs(two_runs):
    a, b, out = two_runs

    pngs = {p.name for p in out.glob("*.png")}
    assert set(p.name for p in out.iterdir()) == pngs | {"index.html"}  # nothing else, no temporary left behind
    assert not list(out.parent.glob(".tmp-*"))
    html = (out / "index.html").read_text()
    assert image_sources(html) == pngs  # every chart on the page, each by its relative name
    assert {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "mfu.png", "peak_mem_gb.png",
            "skipped_steps.png", "expert_load.png"} == pngs  # no RL or MTP data: those charts left out
    assert ">base<" in html and ">high-lr<" in html
    for png in pngs:
        assert imread(out / png).shape[:2] == (360, 640)  # a decodable PNG of the figure's size

    # the lr row differs (highlighted), the seed row does not
    assert re.search(r'<tr class="differs"><td>optimizer.lr</td>\s*<td class="value">0.001</td>\s*'
                     r'<td class="value">0.003</td>', html)
    assert re.search(r"<tr><td>training.seed</td>", html)

    runs = load_runs([a, b])
    lines = {c.name: draw(c, runs).axes[0].get_lines() for c in CHARTS}
    assert [line.get_label() for line in lines["lr"]] == ["base", "high-lr"]
    assert len(lines["loss"]) == 4  # loss and val loss of each run
    assert list(lines["loss"][1].get_xdata()) == [0, 4, 8]  # val loss: step 0's too
    assert [line.get_label() for line in lines["expert_load"]] == ["high-lr"]
    assert list(lines["mfu"][0].get_ydata()) == [25.0] * 5  # shown in %


def test_report_of_one_run_defaults_to_run_dir_report_and_replaces_an_earlier_one(tmp_path, capsys):
    run = make_run(tmp_path / "run", 1e-3, extra={"reward_mean": 0.5, "accuracy": 0.25, "clip_fraction": 0.1},
                   keys={"loss"})
    code, _ = cli(run, capsys=capsys)
    assert code == 0
    assert {p.name for p in (run / "report").glob("*.png")} == {"loss.png", "reward.png", "accuracy.png",
                                                                 "clip_fraction.png"}
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().replace('"reward_mean"', '"reward_x"'))
    again = write_report([run])
    assert again == run / "report" and (again / "reward_x.png").is_file() and not (again / "reward.png").exists()


def test_unfinished_last_line_of_a_running_job_is_left_out(tmp_path):
    run = make_run(tmp_path / "run", 1e-3)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 12, "lo')
    assert read_metrics(run)[-1]["step"] == 10


def cli(*args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(["report", *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_report_errors_are_one_line(tmp_path, capsys):
    good = make_run(tmp_path / "good", 1e-3)
    other = make_run(tmp_path / "other", 1e-3)
    damaged = make_run(tmp_path / "damaged", 1e-3)
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (damaged / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "no-metrics").mkdir()
    (tmp_path / "a-file").write_text("x")
    cases = [
        ([tmp_path / "missing"], "missing: no such run directory"),
        ([tmp_path / "no-metrics"], "has no metrics.jsonl"),
        ([damaged], f"{damaged / 'metrics.jsonl'}:3: damaged line"),
        ([good, "--output", tmp_path / "a-file" / "report"], "cannot write the report to"),
        ([good, "--output", tmp_path / "a-file"], "is a file"),
        ([good, damaged.parent / "good"], "given twice"),
        ([good, other], "--output"),  # several runs: where to?
        ([good, "--output", good], "would replace the run"),
        ([good, "--output", tmp_path / "damaged"], "is not a zili report"),
    ]
    for args, fragment in cases:
        code, err = cli(*args, capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, err)
    assert not (good / "report").exists() and (damaged / "metrics.jsonl").is_file()


def test_help_lists_report(capsys):
    main(["--help"])
    assert "zili report RUN_DIR" in capsys.readouterr().out


# ---- TensorBoard ---------------------------------------------------------------------------------------------

def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard reads the event files (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def jsonl_scalars(run_dir) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                out.setdefault(key, {})[record["step"]] = value
    return out


def log_steps(run_dir, steps, start_step: int = 0):
    log = MetricsLog(run_dir, 20, start_step, enabled=True, progress=False, tensorboard=True)
    for step in steps:
        log.write({"step": step, "loss": 6.0 - step / 7, "lr": 1e-3 * step, "grad_norm": float("nan"),
                   "skipped_steps": step // 5, "sequence_ids": [step, step + 1], "mfu": None})
    log.close()


def test_tensorboard_scalars_equal_metrics_jsonl_also_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    log_steps(tmp_path, [2, 4, 6, 8])
    log_steps(tmp_path, [6, 8, 10], start_step=4)  # resumed from step 4: steps 6 and 8 again, with other values
    expected = jsonl_scalars(tmp_path)
    assert sorted(expected) == ["loss", "lr", "skipped_steps"]  # NaN (null), None and the id list left out
    assert sorted(expected["loss"]) == [2, 4, 6, 8, 10]
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(got) == sorted(expected)
    for tag, by_step in expected.items():
        assert got[tag] == pytest.approx(by_step, rel=1e-6), tag  # float32 in the event files


def test_tensorboard_missing_is_one_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.raises(UserError, match=r"pip install 'zili\[tensorboard\]'"):
        MetricsLog(tmp_path, 10, 0, enabled=False, progress=False, tensorboard=True)  # every rank checks
    MetricsLog(tmp_path, 10, 0, enabled=True, progress=False).close()  # off: not needed


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to render the page")
def test_the_page_renders_with_its_charts(two_runs, tmp_path):
    """A headless browser's screenshot of the page holds the second run's colour (tab:orange) over far more
    pixels than its swatch in the runs table: the PNGs loaded."""
    out = two_runs[2]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1400", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = imread(shot)[..., :3]
    orange = (abs(pixels[..., 0] - 1.0) < 0.06) & (abs(pixels[..., 1] - 0x7F / 255) < 0.06) & (pixels[..., 2] < 0.15)
    assert orange.sum() > 2000
