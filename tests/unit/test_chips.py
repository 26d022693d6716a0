"""The chip table's `match` rules against device names as PyTorch reports them (torch.<type>.get_device_name();
torch_npu reports the CANN SoC name), and what an accelerator the table lacks gets: no peak, so MFU null, and
one warning line — never the short matmul probe that a CPU uses, which reads below a datasheet peak."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types

import pytest
import torch

from zili import accel
from zili.errors import UserError
from zili.train.metrics import MetricsLog, read_metrics

# (device name, expected row or None). Negative cases are as important: a wrong row silently mis-states MFU.
DEVICE_NAMES = [
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H800", "h800"),
    ("NVIDIA H800 PCIe", "h800-pcie"),  # not the SXM row: PCIe peak and NVLink bridge
    ("NVIDIA H20", "h20"),  # not h200
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", "h200-nvl"),
    ("NVIDIA B200", "b200"),
    ("AMD Instinct MI250X", "mi250x"),
    ("AMD Instinct MI300X", "mi300x"),
    ("Ascend910A", "ascend-910"),
    ("Ascend910ProA", "ascend-910proa"),
    ("Ascend910ProB", "ascend-910prob"),
    ("Ascend910PremiumA", "ascend-910premiuma"),
    ("Ascend910B1", "ascend-910b1"),
    ("Ascend910B2", "ascend-910b2"),
    ("Ascend910B2C", "ascend-910b2"),
    ("Ascend910B3", "ascend-910b3"),
    ("Ascend910B4", "ascend-910b4"),
    ("Ascend910B4-1", "ascend-910b4"),
    ("Ascend910_9391", "ascend-910-939x"),  # Atlas A3: one die of a 910C package each, never "Ascend910C"
    ("Ascend910_9392", "ascend-910-939x"),
    ("Ascend910_9381", "ascend-910-938x"),
    ("Ascend910_9382", "ascend-910-938x"),
    ("Ascend910_9372", "ascend-910-9372"),
    ("Ascend910_9362", "ascend-910-9362"),
    ("NVIDIA GH200 480GB", None),  # Grace Hopper: not the h200 row
    ("NVIDIA GB200", None),  # not b200
    ("NVIDIA A800-SXM4-80GB", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("AMD Instinct MI300A", None),
    ("Ascend910B", None),  # the first-generation 30-core bin, not a 910B (2023) part
    ("Ascend910_9363", None),  # the 32 GiB A3 sibling of 9362: no row yet
    ("Ascend310P3", None),
    ("Intel(R) Xeon(R) Platinum 8480+", None),
    ("AMD EPYC 7763 64-Core Processor", None),
]


def rows_matching(name: str) -> list[str]:
    return [row for row, fields in accel.load_chips().items()
            if fields.get("match") and re.search(fields["match"], name, re.IGNORECASE)]


@pytest.mark.parametrize("name,expected", DEVICE_NAMES)
def test_device_name_maps_to_its_row_only(name, expected):
    row = accel.chip_row_for(name)
    assert (row["name"] if row else None) == expected
    # no other row matches either: the table does not rely on its order to tell variants apart
    assert rows_matching(name) == ([expected] if expected else [])


def test_every_match_is_a_valid_pattern_and_every_row_is_reached():
    chips = accel.load_chips()
    for name, row in chips.items():
        if "match" in row:
            assert isinstance(row["match"], str), name
            re.compile(row["match"])
    reached = {row for _, row in DEVICE_NAMES if row}
    runtime = {name for name, row in chips.items() if row.get("match") and not name.startswith(("gaudi", "tpu"))}
    assert runtime <= reached  # every row a device can reach has a real name in the table above


def test_variants_that_differ_get_different_figures():
    chips = accel.load_chips()
    b = [chips[f"ascend-910b{i}"]["bf16_tflops"] for i in (1, 2, 3, 4)]
    assert b == sorted(b, reverse=True) and len(set(b)) == 4  # B1 > B2 > B3 > B4
    assert chips["ascend-910b4"]["hbm_gb"] == 32 and chips["ascend-910b1"]["hbm_gb"] == 64
    assert chips["h800-pcie"]["bf16_tflops"] < chips["h800"]["bf16_tflops"]
    assert chips["h100-nvl"]["hbm_gb"] == 94 and chips["h100-nvl"]["bf16_tflops"] not in (
        chips["h100-sxm"]["bf16_tflops"], chips["h100-pcie"]["bf16_tflops"])
    # an A3 torch device is one die: half a 910C package at most
    assert 2 * chips["ascend-910-939x"]["hbm_gb"] == chips["ascend-910c"]["hbm_gb"]
    assert chips["ascend-910-939x"]["bf16_tflops"] < chips["ascend-910c"]["bf16_tflops"]
    assert chips["ascend-910proa"]["bf16_tflops"] == 0  # first generation: no bf16


def stand_in(device_type: str, name: str) -> accel.Accelerator:
    """An Accelerator of `device_type` whose chip reports `name` (no such device needed)."""
    device = accel.Accelerator(types.SimpleNamespace(type=device_type))
    device.chip_name = lambda: name
    return device


@pytest.fixture
def no_probe(monkeypatch):
    """Forget earlier warnings; fail if the matmul probe runs."""
    monkeypatch.setattr(accel, "_WARNED_PEAKS", set())
    monkeypatch.delenv(accel.CHIP_ENV, raising=False)

    def probe(*args):
        raise AssertionError("the matmul probe ran")

    monkeypatch.setattr(accel, "measured_matmul_flops", probe)


def test_unmatched_accelerator_has_unknown_peak_and_warns_once(no_probe, capsys):
    gpu = stand_in("cuda", "NVIDIA GeForce RTX 4090")
    assert math.isnan(gpu.peak_flops(torch.bfloat16))
    assert math.isnan(gpu.peak_flops(torch.bfloat16))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: chip 'NVIDIA GeForce RTX 4090' (cuda) is not in the chip table")
    assert "MFU is logged as null" in err[0] and "zili/chips.toml" in err[0] and "ZILI_CHIP=" in err[0]


def test_row_without_the_runs_dtype_has_unknown_peak(no_probe, capsys):
    npu = stand_in("npu", "Ascend910A")  # no bf16 there: such a run computes in fp32, whose peak is not in the row
    assert math.isnan(npu.peak_flops(torch.float32))
    assert "row 'ascend-910' has no fp32 peak" in capsys.readouterr().err
    assert stand_in("npu", "Ascend910B3").peak_flops(torch.bfloat16) == pytest.approx(294.9e12)


def test_cpu_keeps_the_measured_probe(monkeypatch, capsys):
    monkeypatch.delenv(accel.CHIP_ENV, raising=False)
    monkeypatch.setattr(accel, "measured_matmul_flops", lambda device, dtype: 1.5e11)
    assert stand_in("cpu", "AMD EPYC 7763 64-Core Processor").peak_flops(torch.float32) == 1.5e11
    assert capsys.readouterr().err == ""


def test_zili_chip_names_the_row(no_probe, monkeypatch):
    monkeypatch.setenv(accel.CHIP_ENV, "h100-nvl")
    gpu = stand_in("cuda", "NVIDIA H100 94GB something new")
    assert gpu.chip_row()["name"] == "h100-nvl" and gpu.peak_flops(torch.bfloat16) == 835.5e12
    monkeypatch.setenv(accel.CHIP_ENV, "h100-nope")
    with pytest.raises(UserError, match="ZILI_CHIP='h100-nope' is not a row of the chip table"):
        gpu.peak_flops(torch.bfloat16)


def test_unknown_peak_is_logged_as_null_mfu(tmp_path):
    """The trainer divides by the peak: an unknown (NaN) peak gives a NaN MFU, which metrics.jsonl holds as null."""
    log = MetricsLog(tmp_path, total_steps=1, start_step=0, enabled=True, progress=False)
    log.write({"step": 1, "loss": 2.0, "tokens_per_s": 100.0, "mfu": 1e9 * 100.0 / (math.nan * 1)})
    log.close()
    assert read_metrics(tmp_path)[0]["mfu"] is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["tokens_per_s"] == 100.0


def test_bench_reports_unknown_mfu_as_null(monkeypatch, tmp_path):
    """`zili bench` on an accelerator the table lacks: strict JSON with null peak and MFU; --compare still charts."""
    from zili.bench import compare, measure

    monkeypatch.setattr(accel.Accelerator, "peak_flops", lambda self, dtype: math.nan)
    tiny = measure.WORKLOADS["dense-tiny"]  # smaller still: its weight initialisation alone takes seconds here
    args = dataclasses.replace(tiny.args, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64)
    monkeypatch.setitem(measure.WORKLOADS, "dense-tiny", dataclasses.replace(tiny, args=args))
    result = measure.run_bench("dense-tiny", steps=1, warmup=1, device="cpu", dtype="fp32", batch=1, seq=16)
    assert result["mfu"] is None and result["peak_tflops"] is None and result["tokens_per_s"] > 0
    json.dumps(result, allow_nan=False)
    other = {**result, "chip": "h100-sxm", "mfu": 0.4}
    assert "MFU" in compare.table([result, other]) and "40.0%" in compare.table([result, other])
    assert compare.chart([result, other], tmp_path / "chart.png").stat().st_size > 1000


@pytest.mark.parametrize("load, cached", [(0.5, True), (64.0, False)], ids=["quiet", "oversubscribed"])
def test_cpu_probe_is_cached_only_when_the_host_was_not_oversubscribed(monkeypatch, tmp_path, load, cached):
    monkeypatch.setenv("ZILI_CACHE", str(tmp_path))
    monkeypatch.setattr(accel.os, "getloadavg", lambda: (load, load, load))
    flops = accel.measured_matmul_flops(torch.device("cpu"), torch.float32, size=64, seconds=0.05)
    assert flops > 0
    assert (tmp_path / "peak_flops.json").is_file() == cached
    if cached:  # and then read back, not measured again
        monkeypatch.setattr(accel.torch, "randn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
        assert accel.measured_matmul_flops(torch.device("cpu"), torch.float32, size=64, seconds=0.05) == flops
