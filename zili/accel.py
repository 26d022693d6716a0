"""The ONE accelerator layer: device choice, collective backend, autocast, sync, memory, seeding, peak FLOP/s.

Everything else in zili asks this module about the device; nothing outside it calls `torch.cuda.*` or a
vendor module. The same code path serves CUDA/ROCm, Ascend (torch_npu), Cambricon (torch_mlu), Moore
Threads (torch_musa), Intel XPU, Apple MPS and CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import resource
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from zili import cpu
from zili.errors import UserError
from zili.fsio import atomic_write_text

# Vendor plugins that register a device type with PyTorch when imported (only if installed).
VENDOR_PLUGINS = {"npu": "torch_npu", "mlu": "torch_mlu", "musa": "torch_musa"}
# Collective backend per device type (ROCm builds report "cuda" and ship rccl under the nccl name).
BACKENDS = {"cuda": "nccl", "npu": "hccl", "mlu": "cncl", "musa": "mccl", "xpu": "xccl", "cpu": "gloo", "mps": "gloo"}

CHIPS_FILE = Path(__file__).with_name("chips.toml")
# Names a chip-table row to use instead of the one matching the device name (a chip the table spells differently).
CHIP_ENV = "ZILI_CHIP"


def cache_dir() -> Path:
    """Where zili caches probes, demo data and tokenizers ($ZILI_CACHE, default ~/.cache/zili)."""
    path = Path(os.environ.get("ZILI_CACHE", Path.home() / ".cache" / "zili"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_vendor_plugins() -> None:
    for module in VENDOR_PLUGINS.values():
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def _module_for(device_type: str):
    """torch.cuda, torch.npu, torch.xpu ... (None for cpu)."""
    return None if device_type == "cpu" else getattr(torch, device_type, None)


def vendor_ops(device_type: str):
    """The vendor plugin module holding fused kernels for `device_type` (torch_npu for "npu"), if installed
    and already imported (it is, once an NPU was chosen); else None."""
    name = VENDOR_PLUGINS.get(device_type)
    return sys.modules.get(name) if name else None


def flash_attn_func():
    """`flash_attn.flash_attn_func` if the optional flash-attention package (CUDA) is installed and imports, else
    None. An install that does not import — an extension built for another torch or CUDA fails with ImportError
    (undefined symbol), OSError (missing library) or RuntimeError; a release without the function with
    AttributeError — prints one warning on stderr and gives None, so that attention uses PyTorch's SDPA instead
    of failing in the first forward. (Whether the function runs on a given device is `zili.kernels`' test.)"""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        print(f"warning: flash-attn is installed but does not import ({type(error).__name__}: {error}); "
              "attention uses PyTorch's scaled_dot_product_attention", file=sys.stderr)
        return None


def detect_device_type() -> str:
    """The best available device type: an accelerator if PyTorch sees one, else 'cpu'."""
    _load_vendor_plugins()
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    for device_type in ("cuda", "npu", "mlu", "musa", "xpu", "mps"):
        module = _module_for(device_type)
        if module is not None and getattr(module, "is_available", lambda: False)():
            return device_type
    return "cpu"


@dataclass
class Accelerator:
    """One process's device. `device` already carries the LOCAL_RANK index for accelerators."""

    device: torch.device

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def backend(self) -> str:
        """torch.distributed backend for this device type."""
        return BACKENDS.get(self.type, "gloo")

    def supports_bf16(self) -> bool:
        """Whether bf16 compute is available and worth it here (on CPU: bf16 matmuls at least as fast as
        fp32's, i.e. native bf16 instructions)."""
        if self.type == "cpu":
            return cpu.bf16_matmul_is_fast()
        module = _module_for(self.type)
        check = getattr(module, "is_bf16_supported", None)
        if check is not None:
            return bool(check())
        try:  # no query (e.g. MPS): try one bf16 operation on the device
            return bool((torch.ones(2, device=self.device, dtype=torch.bfloat16) * 2).sum().item() == 4)
        except (RuntimeError, TypeError):
            return False

    def compute_dtype(self, name: str, warn: bool = True) -> torch.dtype:
        """'bf16' -> torch.bfloat16 where supported (else fp32, with a warning on stderr if `warn`);
        'fp32' -> torch.float32."""
        if name == "bf16":
            if self.supports_bf16():
                return torch.bfloat16
            why = "has no fast bf16 matrix multiply" if self.type == "cpu" else "does not support bf16"
            if warn:
                print(f"warning: this {self.type} {why}; computing in fp32", file=sys.stderr)
        return torch.float32

    def autocast(self, dtype: torch.dtype):
        """Mixed-precision context for the forward pass; a no-op for fp32."""
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (host memory) on this device without making the host wait: on an accelerator it is copied
        into page-locked memory and sent asynchronously, so the host goes on queueing the step while the previous
        one still runs (a copy from pageable memory would wait for it)."""
        if self.type == "cpu":
            return tensor
        try:
            pinned = tensor.pin_memory()
        except RuntimeError:  # no page-locked memory on this backend (e.g. MPS, whose memory is unified)
            return tensor.to(self.device)
        return pinned.to(self.device, non_blocking=True)

    def tune_for_training(self) -> None:
        """Process-wide settings that make training faster on this device type (on CPU: `zili.cpu`)."""
        if self.type == "cpu":
            cpu.tune_allocator()

    def synchronize(self) -> None:
        module = _module_for(self.type)
        if module is not None and hasattr(module, "synchronize"):
            module.synchronize()

    def reset_peak_memory(self) -> None:
        module = _module_for(self.type)
        if module is not None and hasattr(module, "reset_peak_memory_stats"):
            module.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float:
        """Peak device memory allocated (GB = 1e9 bytes); on CPU the process's peak resident set."""
        module = _module_for(self.type)
        if module is not None and hasattr(module, "max_memory_allocated"):
            return module.max_memory_allocated(self.device) / 1e9
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss * (1 if sys.platform == "darwin" else 1024) / 1e9

    def seed(self, seed: int) -> None:
        """Seed torch's CPU and device generators."""
        torch.manual_seed(seed)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's generator states as uint8 CPU tensors under device-neutral keys, so that a checkpoint
        holds the same entries whatever device wrote it (and nothing is pickled): `cpu` the torch CPU generator,
        `device` the accelerator's generator (empty on a CPU, or a device module without one), `device_type` the
        device type it came from as ASCII bytes (b"cuda", b"npu", b"cpu" ...)."""
        device = torch.empty(0, dtype=torch.uint8)
        module = _module_for(self.type)
        if module is not None and hasattr(module, "get_rng_state"):
            device = module.get_rng_state(self.device).cpu()
        return {"cpu": torch.get_rng_state(), "device": device, "device_type": encode_text(self.type)}

    def set_rng_state(self, state: dict[str, torch.Tensor], warn: bool = True) -> None:
        """Restore generator states saved by `rng_state`, whichever device type wrote them: the CPU generator
        always; the device generator only when `device_type` is this device's type (a CUDA generator's state
        means nothing to an NPU). Across device types the device generator keeps its seeded state and, if `warn`,
        a one-line note on stderr says so. Also reads the older layout: {"cpu"} from CPU runs, {"cpu", <type>}
        from accelerator runs."""
        torch.set_rng_state(state["cpu"].cpu())
        if "device_type" in state:
            source, saved = decode_text(state["device_type"]), state.get("device", torch.empty(0))
        else:  # written before `device_type`: the device generator sat under its type's name
            source, saved = next(((k, v) for k, v in state.items() if k != "cpu"), ("cpu", torch.empty(0)))
        module = _module_for(self.type)
        if source == self.type:
            if saved.numel() and module is not None and hasattr(module, "set_rng_state"):
                module.set_rng_state(saved.cpu(), self.device)
            return
        if warn:
            held = f"its {source} generator state does not apply here" if saved.numel() else \
                f"it holds no {self.type} generator state"
            effect = "" if self.type == "cpu" else \
                f"; the {self.type} generator keeps the state training.seed gave it, so random draws on it (dropout) " \
                "differ from an uninterrupted run's"
            print(f"note: the checkpoint was written on {source} and resumes on {self.type}: {held}, only the CPU "
                  f"generator is restored{effect}", file=sys.stderr)

    def chip_name(self) -> str:
        """A human name of the device (GPU model, or the CPU model)."""
        module = _module_for(self.type)
        if module is not None and hasattr(module, "get_device_name"):
            return module.get_device_name(self.device)
        return cpu_model_name()

    def chip_row(self) -> dict | None:
        """This device's chip-table row as {"name": row name, **fields}: the row named by $ZILI_CHIP if set
        (UserError if the table has none of that name), else the row matching `chip_name()`; None if none does."""
        forced = os.environ.get(CHIP_ENV)
        if forced:
            chips = load_chips()
            if forced not in chips:
                raise UserError(f"{CHIP_ENV}={forced!r} is not a row of the chip table — use one of: "
                                f"{', '.join(chips)}")
            return {"name": forced, **chips[forced]}
        return chip_row_for(self.chip_name())

    def peak_flops(self, dtype: torch.dtype) -> float:
        """Peak dense FLOP/s of one device at `dtype` (the row's bf16 figure for bf16, its fp32 figure otherwise).
        From the chip table's row; a CPU without a figure gets a measured matmul probe cached per machine (its
        practical peak). NaN means unknown: an accelerator whose chip has no row, or no figure for `dtype` — a
        short probe there reads below the datasheet peak and would overstate MFU, so MFU (= achieved / NaN) is
        logged as null instead, after a one-line warning on stderr (once per chip and dtype in a process)."""
        row = self.chip_row()
        key = "bf16_tflops" if dtype == torch.bfloat16 else "fp32_tflops"
        if row is not None and row.get(key):  # 0 = unknown / no such mode
            return row[key] * 1e12
        if self.type == "cpu":
            return measured_matmul_flops(self.device, dtype)
        _warn_unknown_peak(self.type, self.chip_name(), row, key)
        return math.nan


def get_accelerator(requested: str = "auto", local_rank: int | None = None) -> Accelerator:
    """The device for this process. `requested` is 'auto' or a torch device string; accelerators get
    index LOCAL_RANK unless the string names one."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = detect_device_type() if requested == "auto" else requested.split(":")[0]
    if requested != "auto" and device_type != "cpu":
        _load_vendor_plugins()
        try:
            torch.device(requested)
        except RuntimeError:
            plugin = VENDOR_PLUGINS.get(device_type)
            if plugin and importlib.util.find_spec(plugin) is None:
                raise UserError(f"training.device {requested!r} needs the {plugin} plugin, which is not installed — "
                                f"install the {plugin} release matching your torch (docs/accelerators.md)") from None
            raise UserError(f"training.device {requested!r} is not a torch device — "
                            "use auto, cpu, cuda, npu, xpu, mps ...") from None
        module = _module_for(device_type)
        if device_type != "cpu" and (module is None or not module.is_available()):
            raise UserError(f"training.device {requested!r} is not available on this machine — "
                            "use --training.device=auto")
    if device_type == "cpu":
        return Accelerator(torch.device("cpu"))
    index = int(requested.split(":")[1]) if ":" in requested else local_rank
    device = torch.device(device_type, index)
    module = _module_for(device_type)
    if hasattr(module, "set_device"):
        module.set_device(device)
    return Accelerator(device)


_WARNED_PEAKS: set[tuple[str, str]] = set()  # (chip, dtype key) already warned about in this process


def _warn_unknown_peak(device_type: str, chip: str, row: dict | None, key: str) -> None:
    """The one-line warning that MFU is unknown for `chip`, and how to give it a peak."""
    if (chip, key) in _WARNED_PEAKS:
        return
    _WARNED_PEAKS.add((chip, key))
    if row is None:
        why = f"chip {chip!r} ({device_type}) is not in the chip table"
        fix = (f"add a [chip.NAME] row whose `match` finds this name to zili/chips.toml (docs/accelerators.md), or "
               f"set {CHIP_ENV}=<row> to use a row of `zili chips`")
    else:
        why = f"chip-table row {row['name']!r} has no {key.removesuffix('_tflops')} peak"
        bf16_instead = key != "bf16_tflops" and row.get("bf16_tflops")  # only where the chip has bf16
        fix = f"add {key} to that row in zili/chips.toml" + (", or train in bf16" if bf16_instead else "")
    print(f"warning: {why}, so MFU is logged as null (unknown) — {fix}", file=sys.stderr)


def encode_text(text: str) -> torch.Tensor:
    """`text` as a uint8 tensor of its ASCII bytes: a string a checkpoint can hold without pickling."""
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def decode_text(tensor: torch.Tensor) -> str:
    """The string `encode_text` made `tensor` from."""
    return bytes(tensor.to(torch.uint8).tolist()).decode("ascii", errors="replace")


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_chips() -> dict[str, dict]:
    """The chip table: row name -> fields (see chips.toml)."""
    return tomllib.loads(CHIPS_FILE.read_text())["chip"]


CHIP_COLUMNS = (("bf16_tflops", "bf16 TF/s"), ("fp16_tflops", "fp16 TF/s"), ("fp8_tflops", "fp8 TF/s"),
                ("fp32_tflops", "fp32 TF/s"),
                ("hbm_gb", "HBM GB"), ("hbm_tbps", "HBM TB/s"), ("scale_up_gbps", "scale-up GB/s"),
                ("scale_out_gbps", "scale-out GB/s"))


def describe_chips() -> str:
    """The chip table as text, one row per chip; `?` marks figures the table flags as unsure, `-` a mode the
    chip lacks."""
    header = ["chip", *(title for _, title in CHIP_COLUMNS)]
    rows = []
    for name, row in load_chips().items():
        if row.get("measured"):
            rows.append([name, *["measured" if key == "bf16_tflops" else "" for key, _ in CHIP_COLUMNS]])
            continue
        cells = [name]
        for key, _ in CHIP_COLUMNS:
            value = row.get(key, 0)
            text = "-" if not value else f"{value:g}"
            cells.append(text + ("?" if key in row.get("unsure", ()) else ""))
        rows.append(cells)
    table = tabulate(rows, header, tablefmt="plain", colalign=("left", *["right"] * len(CHIP_COLUMNS)),
                     disable_numparse=True)
    return table + "\n\n? = unsure (see `source` in zili/chips.toml); - = not supported; dense peaks, no sparsity"


def chip_row_for(device_name: str) -> dict | None:
    """The first chip-table row, in file order, whose `match` regular expression is found in `device_name`
    (case-insensitive), as {"name": row name, **fields}; None if none is. Rows without `match` never match."""
    for name, row in load_chips().items():
        pattern = row.get("match")
        if pattern and re.search(pattern, device_name, re.IGNORECASE):
            return {"name": name, **row}
    return None


def host_oversubscribed() -> bool:
    """Whether more processes wanted the CPUs over the last minute than there are CPUs (load average), so that a
    timing taken now measures the other jobs as much as this machine."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average (Windows)
        return False


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5,
                          bursts: int = 5) -> float:
    """Achieved FLOP/s of a square matmul on `device` — the practical peak of a CPU: the fastest of `bursts`
    timed bursts (together `seconds` long), so that a moment of load from other jobs does not lower it. Cached per
    machine, thread count, torch version and dtype in cache_dir()/peak_flops.json — but not when the host was
    oversubscribed (`host_oversubscribed`): such a figure is too low, and a cached one would make every later run
    report an MFU above its true value (even above 1), so the next run measures again."""
    key = f"{Accelerator(device).chip_name()}|{torch.get_num_threads()}|{torch.__version__}|{device.type}|{dtype}"
    cache = cache_dir() / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    module = _module_for(device.type)
    sync = getattr(module, "synchronize", lambda: None) if module is not None else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    flops = 0.0
    for _ in range(bursts):
        runs, start = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - start < seconds / bursts:
            a @ b
            runs += 1
            sync()
        flops = max(flops, 2 * size**3 * runs / (time.perf_counter() - start))
    if not host_oversubscribed():
        known[key] = flops
        atomic_write_text(cache, json.dumps(known, indent=1))
    return flops
