"""No zili code unpickles a file: a pickle runs code when loaded, and zili reads files from strangers (datasets,
Hugging Face checkpoints, bench results). Every .py under zili/ and benchmarks/ is parsed and searched:

- `torch.load(...)` only with `weights_only=True`;
- `np.load(...)` / `numpy.load(...)` never with `allow_pickle=True`;
- no pickle-like module at all (`import pickle`, `from pickle import load`, `pickle.loads`, cloudpickle, dill,
  joblib, `pandas.read_pickle`), with one narrow exception: naming `pickle.UnpicklingError` in an `except` clause.
  DCP's own `.metadata` file is a pickle that DCP reads (zili.checkpoint catches its error to say the file is
  damaged); that is why a checkpoint is trusted input and `zili export-hf` (safetensors) is the format for
  weights from strangers (README, docs/architecture.md).

The search is of the syntax tree, not the text: docstrings and comments may speak of pickles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
ALLOWED_ATTRIBUTES = {("pickle", "UnpicklingError"), ("pickle", "PickleError")}  # exception classes, to catch


def sources() -> list[Path]:
    return sorted(p for d in ("zili", "benchmarks") for p in (REPO / d).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    """`torch.load` for the expression torch.load, '' for anything not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return ""


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def problems(source: str, where: str) -> list[str]:
    """Every way `source` could unpickle something, as 'where:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES and alias.name != "pickle":
                    found.append(f"{line}: import {alias.name}")
                elif alias.name == "pickle" and alias.asname:
                    found.append(f"{line}: import pickle as {alias.asname}")  # hides its uses from the check below
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            names = {alias.name for alias in node.names}
            if node.module != "pickle" or names - {attr for _, attr in ALLOWED_ATTRIBUTES}:
                found.append(f"{line}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Attribute) and _dotted(node.value) == "pickle":
            if ("pickle", node.attr) not in ALLOWED_ATTRIBUTES:
                found.append(f"{line}: pickle.{node.attr}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("torch.load", "torch.serialization.load") and not _keyword_true(node, "weights_only"):
                found.append(f"{line}: {name}(...) without weights_only=True")
            if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                if not all(isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords if k.arg == "allow_pickle"):
                    found.append(f"{line}: {name}(..., allow_pickle=...)")
            if name.endswith("read_pickle"):
                found.append(f"{line}: {name}(...)")
    return found  # a plain `import pickle` is allowed: every use of it other than the exception names is reported


def test_no_code_unpickles_a_file():
    files = sources()
    assert len(files) > 50, "zili/ and benchmarks/ not found"
    found = [p for path in files for p in problems(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not found, "code that could unpickle a file:\n" + "\n".join(found)


@pytest.mark.parametrize("source, fragment", [
    ("import pickle\npickle.load(f)\n", "pickle.load"),
    ("import pickle\nx = pickle.loads(b)\n", "pickle.loads"),
    ("from pickle import load\n", "from pickle import load"),
    ("import cloudpickle\n", "import cloudpickle"),
    ("import dill\n", "import dill"),
    ("import pickle as p\n", "import pickle as p"),
    ("import torch\ntorch.load(path)\n", "without weights_only"),
    ("import torch\ntorch.load(path, weights_only=False)\n", "without weights_only"),
    ("import numpy as np\nnp.load(path, allow_pickle=True)\n", "allow_pickle"),
    ("import pandas as pd\npd.read_pickle(path)\n", "read_pickle"),
])
def test_the_check_finds_each_way(source, fragment):
    found = problems(source, "x.py")
    assert found and fragment in found[0], found


@pytest.mark.parametrize("source", [
    "import pickle\ntry:\n    f()\nexcept pickle.UnpicklingError:\n    pass\n",
    "import torch\ntorch.load(path, weights_only=True, map_location='cpu')\n",
    "import numpy as np\nnp.load(path)\nnp.load(path, allow_pickle=False)\n",
    '"""DCP\'s .metadata is a pickle: pickle.load runs code."""\n',
])
def test_the_check_allows_safe_code(source):
    assert problems(source, "x.py") == []
