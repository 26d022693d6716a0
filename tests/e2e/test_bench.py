"""`zili bench`: a standard workload measured on this CPU, and the side-by-side comparison."""

from __future__ import annotations

import json

import pytest

from zili.accel import load_chips
from zili.bench.workloads import WORKLOADS
from zili.models.flops import flops_per_token, param_counts
from zili.train.metrics import read_metrics

FIELDS = ("device", "chip", "workload", "tokens_per_s", "tflops", "mfu", "peak_mem_gb", "a100_ratio")


def bench(out, *args: str) -> dict:
    """`zili bench ARGS --json OUT` in a subprocess; the JSON it prints (the same as it wrote to OUT)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import seed_peak_flops

    repo = Path(__file__).resolve().parents[2]
    seed_peak_flops(out.parent / "cache")
    env = {**os.environ, "ZILI_CACHE": str(out.parent / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "zili", "bench", *args, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(out.read_text())
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory, tiny_dataset, peak_flops):
    """dense-tiny, on `zili train`'s first batch of the test dataset (seed 7, 4 x 32 tokens, fp32)."""
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    bench(out, "--workload", "dense-tiny", "--steps", "2", "--warmup", "1", "--batch", "4", "--seq", "32", "--dtype",
          "fp32", "--seed", "7", "--data", str(tiny_dataset))
    return out


def check_consistent(r: dict, workload: str, batch: int, seq: int) -> None:
    assert all(r[k] is not None for k in FIELDS)
    assert r["device_type"] == "cpu" and r["chip"] == "cpu" and r["workload"] == workload
    args = WORKLOADS[workload].args
    assert r["params"] == param_counts(args)["total"]
    per_token = flops_per_token(args, seq)
    assert r["tokens_per_s"] == pytest.approx(r["steps"] * batch * seq / (r["steps"] * r["step_s"]))
    assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"])
    a100 = load_chips()["a100-80gb"]["bf16_tflops"] * 1e12 * r["a100_reference_mfu"] / per_token
    assert r["a100_ratio"] == pytest.approx(r["tokens_per_s"] / a100)
    assert r["peak_mem_gb"] > 0


def test_bench_result_is_consistent(bench_json):
    check_consistent(json.loads(bench_json.read_text()), "dense-tiny", 4, 32)


@pytest.mark.slow  # initialising and stepping 134 M parameters: close to a minute here; the default run measures
def test_bench_dense_125m_is_consistent(tmp_path, peak_flops):  # dense-tiny (test_bench_result_is_consistent)
    """dense-125m, shrunk to 1 x 64 tokens."""
    r = bench(tmp_path / "cpu.json", "--workload", "dense-125m", "--steps", "2", "--warmup", "1", "--batch", "1",
              "--seq", "64")
    check_consistent(r, "dense-125m", 1, 64)
    assert 120e6 < r["params"] < 140e6
    assert r["peak_mem_gb"] > 0.5  # fp32 weights + AdamW state of 134 M parameters


def test_compare_prints_both_and_charts_them(bench_json, tmp_path, zili_cli):
    other = json.loads(bench_json.read_text())
    other.update(device="NVIDIA H100 80GB HBM3", chip="h100-sxm", tokens_per_s=other["tokens_per_s"] * 50, mfu=0.4)
    (tmp_path / "gpu.json").write_text(json.dumps(other))
    png = tmp_path / "chart.png"
    proc = zili_cli("bench", "--compare", bench_json, tmp_path / "gpu.json", "--png", png)
    assert proc.returncode == 0, proc.stderr
    assert "(cpu)" in proc.stdout and "(h100-sxm)" in proc.stdout and "40.0%" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_bench_input_is_one_line(tmp_path, capsys):
    """Through zili.cli.main in this process (the exit code and stderr as a subprocess would give them)."""
    from zili.cli import main

    (tmp_path / "x.json").write_text("{}")
    for args in (["--compare", tmp_path / "x.json"], ["--steps", "0"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["bench", *map(str, args)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")


def test_bench_and_train_take_the_same_first_step(bench_json, zili_cli, tiny_dataset, tmp_path):
    """`zili bench` builds and steps its model through the trainer's own code: same shape, seed and batch
    give the trainer's step-1 loss."""
    first = json.loads(bench_json.read_text())["first_loss"]
    w = WORKLOADS["dense-tiny"].args
    run = tmp_path / "run"
    zili_cli("train", f"--data.dataset={tiny_dataset}", f"--model.n_layers={w.n_layers}", f"--model.dim={w.dim}",
             f"--model.n_heads={w.n_heads}", f"--model.n_kv_heads={w.n_kv_heads}", f"--model.ffn_dim={w.ffn_dim}",
             f"--model.vocab_size={w.vocab_size}", f"--model.rope_theta={w.rope_theta}",
             "--model.tied_embeddings=false", "--training.seed=7", "--training.batch_size=4", "--training.seq_len=32",
             "--training.steps=1", "--training.dtype=fp32", "--training.eval_every=0", "--training.sample_tokens=0",
             "--metrics.progress=false", f"--training.run_dir={run}", check=True)
    step1 = read_metrics(run)[0]
    assert step1["step"] == 1 and step1["loss"] == pytest.approx(first, rel=1e-6, abs=0)
