"""benchmarks/gpu_check.sh on a machine without a GPU: its help names the parts; a part that crashes, hangs or
writes garbage is recorded and the others still run, within the budget; a CPU smoke run (tiny workload) goes
through every part — the GPU tests collected and skipped, bench and peer measured, the ratio computed — into the
JSON and the summary; a missing tomli-w stops it with one line, and --wheels installs it offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _load_driver():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package, nor put on sys.path here)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()

GPU_TESTS = {"test_model_cuda::test_bf16_cuda_forward_backward_matches_cpu_fp32",
             *(f"test_attention_cuda::test_sdpa_training_path_matches_textbook[sdpa-{kernel}]"
               for kernel in ("default", "cudnn", "flash")),
             "test_attention_cuda::test_sdpa_generation_path_matches_textbook",
             "test_attention_cuda::test_flash_attn_path_matches_textbook",
             "test_compile_cuda::test_compiled_model_trains_like_eager",
             "test_resume_cuda::test_cuda_run_resumes_exactly",
             "test_resume_cuda::test_cpu_checkpoint_resumes_on_cuda"}


def run_script(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_help_names_every_part_and_option():
    proc = run_script("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for word in ("env ", "tests ", "bench ", "peer ", "ratio", "--wheels", "--out", "--skip", "--budget", "dense-1b",
                 "pytest tests/gpu -m gpu", "pip download"):
        assert word in proc.stdout, word


def test_a_failing_part_does_not_hide_the_others(tmp_path):
    """Four parts: one exits with an error, one hangs (with a child process of its own), one writes an unreadable
    result, one succeeds. Each is recorded as it went; the hung one is cut to what the budget leaves after the
    floors reserved for the parts after it, and killed with its child."""
    py = sys.executable
    child_pid = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    parts = [
        gpu_check.Part("crash", [py, "-c", "import sys; print('going down'); sys.exit('boom')"], "crash.json",
                       gpu_check.read_env, limit_s=30, floor_s=0),
        gpu_check.Part("hang", [py, "-c", hang], "hang.json", gpu_check.read_env, limit_s=60, floor_s=0),
        gpu_check.Part("garbled", [py, "-c", f"open({str(tmp_path / 'garbled.json')!r}, 'w').write('{{not json')"],
                       "garbled.json", gpu_check.read_env, limit_s=30, floor_s=2),
        gpu_check.Part("good", [py, "-c", f"open({str(tmp_path / 'good.json')!r}, 'w').write('{{\"x\": 1}}')"],
                       "good.json", gpu_check.read_env, limit_s=30, floor_s=2),
    ]
    seen = []
    start = time.monotonic()
    records = gpu_check.run_parts(parts, tmp_path, dict(os.environ), budget_s=8,
                                  on_record=lambda name, record: seen.append(name))
    assert seen == ["crash", "hang", "garbled", "good"]
    assert time.monotonic() - start < 8

    crash, hung, garbled, good = (records[name] for name in seen)
    assert not crash["ok"] and crash["error"].splitlines()[0] == "exit code 1: boom"  # the summary's line
    assert "going down" in Path(crash["log"]).read_text()
    assert not hung["ok"] and hung["error"].startswith("timed out after")
    assert hung["time_limit_s"] <= 4 and hung["seconds"] < 6  # 8 s budget - the floors kept for the last two
    state = Path(f"/proc/{child_pid.read_text()}/status")
    assert not state.exists() or "zombie" in state.read_text()  # the whole process group was killed
    assert not garbled["ok"] and "could not read garbled.json" in garbled["error"]
    assert good["ok"] and good["error"] is None and good["figures"] == {"x": 1}

    data = gpu_check.assemble(gpu_check.parse_args(["--skip", "peer"]), records, 8.0, "now")
    assert data["ok"] is False and set(data["parts"]) == {"crash", "hang", "garbled", "good", "peer"}
    assert data["parts"]["peer"] == {"skipped": True}
    assert data["ratio"]["zili_over_peer"] is None


@pytest.mark.slow  # four processes each importing torch, pytest, transformers: ~half a minute on 2 cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run expects the GPU tests to be skipped")
def test_cpu_smoke_run_records_every_part_and_the_ratio(tmp_path):
    out = tmp_path / "check.json"
    proc = run_script("--device", "cpu", "--workload", "dense-tiny", "--no-compile", "--steps", "1", "--warmup", "1",
                      "--batch", "2", "--seq", "32", "--out", out, env={"ZILI_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the tests part fails: no GPU, nothing ran
    data = json.loads(out.read_text())
    parts = data["parts"]
    assert list(parts) == ["env", "tests", "bench", "peer"]
    assert data["ok"] is False and data["torch"] == torch.__version__ and data["device"]
    for name in ("env", "bench", "peer"):
        assert parts[name]["ok"] and parts[name]["error"] is None and parts[name]["seconds"] > 0, parts[name]

    tests = parts["tests"]  # every GPU test collected and skipped, none run
    assert not tests["ok"] and tests["error"].startswith("no test ran")
    assert tests["figures"]["passed"] == tests["figures"]["failed"] == 0
    assert set(tests["figures"]["tests"]) == GPU_TESTS
    assert all(t["outcome"] == "skipped" and "needs a CUDA GPU" in t["message"]
               for t in tests["figures"]["tests"].values())

    bench, peer = parts["bench"]["figures"], parts["peer"]["figures"]
    for figures in (bench, peer):
        assert (figures["workload"], figures["batch"], figures["seq_len"], figures["steps"]) == ("dense-tiny", 2, 32, 1)
        assert figures["tokens_per_s"] > 0 and figures["peak_mem_gb"] > 0
    assert peer["params"] == peer["zili_params"] == bench["params"]
    assert peer["attn_implementation"] == "sdpa" and peer["param_dtype"] == "float32"
    assert data["ratio"]["zili_over_peer"] == pytest.approx(bench["tokens_per_s"] / peer["tokens_per_s"])

    for line in ("tests  FAILED", "bench  ok", "peer   ok", "ratio  zili tokens/s / peer tokens/s =", str(out)):
        assert line in proc.stdout, line
    files = tmp_path / "check-files"
    assert {"env.json", "tests.xml", "bench.json", "peer.json", "bench.log"} <= {p.name for p in files.iterdir()}


def fake_tomli_w_wheel(directory: Path) -> Path:
    """A pure-Python wheel of a stand-in `tomli_w` package: what `pip download tomli-w` brings, for pip's sake."""
    directory.mkdir()
    wheel = directory / "tomli_w-1.2.0-py3-none-any.whl"
    files = {"tomli_w/__init__.py": "FROM_WHEEL = True\n",
             "tomli_w-1.2.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tomli_w\nVersion: 1.2.0\n",
             "tomli_w-1.2.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n"}
    record = "tomli_w-1.2.0.dist-info/RECORD"
    files[record] = "".join(f"{name},,\n" for name in [*files, record])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return directory


def test_missing_tomli_w_stops_with_one_line_and_wheels_bring_it(tmp_path):
    shadow = tmp_path / "shadow" / "tomli_w"  # as on the GPU machine: `import tomli_w` fails
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'tomli_w'\")\n")
    env = {"PYTHONPATH": str(shadow.parent), "TMPDIR": str(tmp_path)}
    missing = run_script("--dry-run", env=env, timeout=60)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error:") and len(missing.stderr.strip().splitlines()) == 1
    assert "tomli_w" in missing.stderr and "--wheels" in missing.stderr

    wheels = fake_tomli_w_wheel(tmp_path / "wheels")
    installed = run_script("--dry-run", "--wheels", wheels, env=env, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert [line.split()[0] for line in installed.stdout.splitlines()[:4]] == ["env", "tests", "bench", "peer"]
    assert "limit 210 s" in installed.stdout and "budget 450 s" in installed.stdout
    sites = list(tmp_path.glob("zili-gpu-check-site-*"))
    assert len(sites) == 1 and (sites[0] / "tomli_w" / "__init__.py").read_text() == "FROM_WHEEL = True\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_script("--dry-run", "--wheels", empty, env=env, timeout=60)
    assert none.returncode == 2 and "no *.whl files" in none.stderr
