"""zili (自立): train large language models on any accelerator with PyTorch's own distributed engine.

Importing zili checks the torch it runs on first: below `TORCH_FLOOR` (see docs/accelerators.md, "PyTorch
versions", for why 2.9) it prints one line and exits with status 2.
"""

import re
import sys

import torch

__version__ = "0.1.0"
TORCH_FLOOR = (2, 9)  # keep equal to pyproject's `torch>=` bound


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.6.0+cu124' or '2.9.0a0+git1234'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


if torch_release(torch.__version__) < TORCH_FLOOR:
    print(f"error: zili needs torch >= {'.'.join(map(str, TORCH_FLOOR))}, found torch {torch.__version__} — install a "
          "newer torch (with a vendor plugin such as torch_npu: its release built for that torch)", file=sys.stderr)
    sys.exit(2)
