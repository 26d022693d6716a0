"""What machine the GPU check ran on: the `env` part of benchmarks/gpu_check.py.

    python benchmarks/gpu_env.py DEVICE OUT.json

Writes one JSON object to OUT.json: `device` (the device's name as zili's accelerator layer reports it),
`chip` (zili's chip-table row for it, None when unknown: MFU then rests on a measured probe), `device_type`,
the versions of Python, torch, CUDA (torch's build), cuDNN, transformers, flash-attn and tomli-w (None when not
installed), and on CUDA the device count, compute capability, memory (GB = 1e9 bytes) and whether bf16 is
supported. Exits 1 with one line on stderr when DEVICE cannot be used (e.g. `cuda` where torch sees no GPU),
after writing what it could find.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(device: str) -> tuple[dict, str | None]:
    """(facts about this machine, why DEVICE is unusable or None)."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "transformers": version("transformers"),
            "flash_attn": version("flash-attn") or version("flash_attn"), "tomli_w": version("tomli-w"),
            "requested_device": device}
    try:
        from zili.accel import chip_row_for, get_accelerator
        from zili.errors import UserError

        accel = get_accelerator(device)
    except (ImportError, UserError) as e:
        return info, f"{type(e).__name__}: {e}"
    name = accel.chip_name()
    row = chip_row_for(name)
    info.update(device=name, device_type=accel.type, chip=row["name"] if row else None)
    if accel.type == "cuda":
        props = torch.cuda.get_device_properties(accel.device)
        info.update(device_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 1e9, 1), bf16=torch.cuda.is_bf16_supported())
    return info, None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    info, problem = probe(argv[0])
    Path(argv[1]).write_text(json.dumps(info, indent=1) + "\n")
    if problem:
        print(f"error: device {argv[0]!r} is not usable here — {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # zili from this checkout, installed or not
    sys.exit(main(sys.argv[1:]))
