"""The accelerator layer: device and backend choice (vendor plugins absent, and simulated present), the
chip table, and the rule that nothing outside zili/accel.py touches a device module."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from zili import accel, cpu

REQUIRED_ROWS = ["a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h100-nvl", "h800", "h800-pcie", "h20", "h200",
                 "b200", "mi250x", "mi300x", "gaudi2", "gaudi3", "tpu-v4", "tpu-v5p", "ascend-910", "ascend-910b",
                 "ascend-910b1", "ascend-910b2", "ascend-910b3", "ascend-910b4", "ascend-910c", "ascend-910-939x",
                 "cpu"]
FIGURES = ["bf16_tflops", "fp16_tflops", "fp8_tflops", "fp32_tflops", "hbm_gb", "hbm_tbps", "scale_up_gbps",
           "scale_out_gbps"]


def test_chip_table_has_every_required_row_with_sane_figures():
    chips = accel.load_chips()
    assert set(REQUIRED_ROWS) <= set(chips)
    for name, row in chips.items():
        assert row.get("source"), name
        if row.get("measured"):
            continue
        for key in FIGURES:
            assert isinstance(row[key], (int, float)) and row[key] >= 0, (name, key)
        assert row["hbm_gb"] > 0 and row["hbm_tbps"] > 0 and max(row["bf16_tflops"], row["fp16_tflops"]) > 0, name
        assert set(row.get("unsure", [])) <= set(FIGURES), name
        assert row["fp8_tflops"] == 0 or row["fp8_tflops"] >= row["fp16_tflops"], name


def test_zili_chips_prints_every_row(zili_cli):
    proc = zili_cli("chips")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip() and not line.startswith("?")]
    assert names == list(accel.load_chips())
    assert "2250?" in proc.stdout  # b200 bf16 is flagged unsure


def test_peak_comes_from_the_matching_row(monkeypatch):
    monkeypatch.setattr(accel.Accelerator, "chip_name", lambda self: "NVIDIA H100 80GB HBM3")
    assert accel.Accelerator(torch.device("cpu")).peak_flops(torch.bfloat16) == 989e12
    assert accel.chip_row_for("NVIDIA H100 PCIe")["name"] == "h100-pcie"
    assert accel.chip_row_for("Ascend910B3")["name"] == "ascend-910b3"  # tests/unit/test_chips.py: every name
    assert accel.chip_row_for("Some Unknown Chip") is None


def test_no_device_module_outside_the_accelerator_layer():
    root = Path(accel.__file__).parent
    pattern = re.compile(r"torch\.(cuda|npu|mlu|musa|xpu|mps)\b|import torch_(npu|mlu|musa)|from torch_(npu|mlu|musa)")
    offenders = [f"{path.relative_to(root.parent)}:{i}" for path in root.rglob("*.py") if path.name != "accel.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_cpu_without_plugins(monkeypatch):
    monkeypatch.setattr(accel.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert accel.detect_device_type() == "cpu"
    assert accel.get_accelerator("auto").backend == "gloo"


@pytest.mark.parametrize("plugin,device_type,backend", [("torch_npu", "npu", "hccl"), ("torch_mlu", "mlu", "cncl"),
                                                        ("torch_musa", "musa", "mccl")])
def test_vendor_plugin_is_imported_and_picks_its_backend(monkeypatch, plugin, device_type, backend):
    imported = []
    fake = types.ModuleType(plugin)
    monkeypatch.setitem(sys.modules, plugin, fake)
    monkeypatch.setattr(accel.importlib.util, "find_spec", lambda name: object() if name == plugin else None)
    real_import = accel.importlib.import_module
    monkeypatch.setattr(accel.importlib, "import_module", lambda name: imported.append(name) or real_import(name))
    # what the plugin does on import: PyTorch then reports its device as the current accelerator
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: types.SimpleNamespace(type=device_type))
    assert accel.detect_device_type() == device_type
    assert imported == [plugin]
    assert accel.Accelerator(types.SimpleNamespace(type=device_type)).backend == backend


@pytest.mark.parametrize("device_type,backend", [("cuda", "nccl"), ("xpu", "xccl"), ("cpu", "gloo"), ("mps", "gloo")])
def test_backend_per_device_type(device_type, backend):
    assert accel.Accelerator(types.SimpleNamespace(type=device_type)).backend == backend


def test_unavailable_device_is_one_line_error():
    with pytest.raises(accel.UserError, match="not available on this machine"):
        accel.get_accelerator("cuda")


def test_missing_plugin_is_named(monkeypatch):
    monkeypatch.setattr(accel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(accel.UserError, match="needs the torch_npu plugin, which is not installed"):
        accel.get_accelerator("npu")


def test_cpu_peak_memory_is_reported_in_gb():
    assert 0.01 < accel.Accelerator(torch.device("cpu")).peak_memory_gb() < 64


@pytest.mark.parametrize("bf16_seconds,expected", [(10.0, torch.float32), (0.5, torch.bfloat16)])
def test_cpu_computes_in_bf16_only_where_its_matmuls_are_fast(monkeypatch, capsys, bf16_seconds, expected):
    """Without native bf16 instructions a CPU multiplies bf16 matrices ~100x slower than fp32: train in fp32."""
    cpu.bf16_matmul_is_fast.cache_clear()
    monkeypatch.setattr(cpu, "_matmul_seconds", lambda dtype, size, reps: bf16_seconds if dtype == torch.bfloat16
                        else 1.0)
    try:
        assert accel.Accelerator(torch.device("cpu")).compute_dtype("bf16") == expected
        assert ("no fast bf16 matrix multiply" in capsys.readouterr().err) == (expected == torch.float32)
    finally:
        cpu.bf16_matmul_is_fast.cache_clear()


def test_rng_state_has_device_neutral_keys():
    state = accel.Accelerator(torch.device("cpu")).rng_state()
    assert set(state) == {"cpu", "device", "device_type"}
    assert all(t.dtype == torch.uint8 and t.device.type == "cpu" for t in state.values())
    assert state["device"].numel() == 0 and accel.decode_text(state["device_type"]) == "cpu"
    assert accel.decode_text(accel.encode_text("privateuseone")) == "privateuseone"


class FakeGenerators:
    """A device module's generator functions, on host memory."""

    def __init__(self):
        self.restored = []

    def get_rng_state(self, device=None):
        return torch.arange(16, dtype=torch.uint8)

    def set_rng_state(self, state, device=None):
        self.restored.append(state)


@pytest.mark.parametrize("saved_type,legacy,restored", [("npu", False, True), ("npu", True, True),
                                                        ("cuda", False, False), ("cuda", True, False),
                                                        ("cpu", False, False), ("cpu", True, False)])
def test_device_generator_is_restored_only_on_its_own_device_type(monkeypatch, capsys, saved_type, legacy, restored):
    """On a (stand-in) NPU: the CPU generator always comes back; the device one only from an NPU-written state, in
    the current layout or the older one ({"cpu"} from CPU runs, {"cpu", <type>} from accelerator runs)."""
    fake = FakeGenerators()
    monkeypatch.setattr(accel, "_module_for", lambda device_type: fake if device_type == "npu" else None)
    device_state = torch.full((16,), 7, dtype=torch.uint8) if saved_type != "cpu" else torch.empty(0, dtype=torch.uint8)
    cpu_state = torch.get_rng_state()
    if legacy:
        state = {"cpu": cpu_state, **({saved_type: device_state} if saved_type != "cpu" else {})}
    else:
        state = {"cpu": cpu_state, "device": device_state, "device_type": accel.encode_text(saved_type)}
    torch.manual_seed(123)  # moves the CPU generator away from the saved state
    accel.Accelerator(types.SimpleNamespace(type="npu")).set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert [t.tolist() for t in fake.restored] == ([device_state.tolist()] if restored else [])
    err = capsys.readouterr().err
    if restored:
        assert err == ""
    else:
        assert len(err.strip().splitlines()) == 1
        assert err.startswith(f"note: the checkpoint was written on {saved_type} and resumes on npu")


def test_rng_note_can_be_silenced(capsys):
    """Ranks other than 0 restore without printing (the trainer passes warn=is_main())."""
    state = {"cpu": torch.get_rng_state(), "device": torch.zeros(16, dtype=torch.uint8),
             "device_type": accel.encode_text("cuda")}
    accel.Accelerator(torch.device("cpu")).set_rng_state(state, warn=False)
    assert capsys.readouterr().err == ""
    accel.Accelerator(torch.device("cpu")).set_rng_state(state)
    assert "written on cuda and resumes on cpu: its cuda generator state does not apply here" in capsys.readouterr().err
