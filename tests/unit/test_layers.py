"""Layers import one way: a module imports only from layers below its own (or from its own package). Every
import counts, including those inside functions, so a cycle cannot hide in a function body. The order is
drawn in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "zili"

# bottom first; the units of one layer may not import each other
LAYERS = [
    ["zili", "zili.errors"],
    ["zili.fsio"],
    ["zili.compat", "zili.cpu"],
    ["zili.accel"],
    ["zili.kernels"],
    ["zili.models"],
    ["zili.data"],
    ["zili.config"],
    ["zili.parallel"],
    ["zili.checkpoint"],
    ["zili.interop"],
    ["zili.infer"],
    ["zili.train", "zili.eval"],
    ["zili.bench", "zili.plan", "zili.report"],
    ["zili.cli"],
    ["zili.__main__"],
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: its top-level module or package under zili."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def imported_modules(source: str, known: set[str]) -> set[str]:
    """Every zili module `source` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "zili"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "zili":
            for alias in node.names:  # `from zili import checkpoint` imports the module zili.checkpoint
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def upward_edges(sources: dict[str, str]) -> list[str]:
    """'a -> b' for each import of a module `b` that is not below `a`'s layer (nor in `a`'s own unit)."""
    known = set(sources)
    bad = []
    for module, source in sorted(sources.items()):
        here = unit_of(module)
        for target in sorted(imported_modules(source, known)):
            there = unit_of(target)
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                bad.append(f"{module} -> {target}")
    return bad


def zili_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in ROOT.rglob("*.py")}


def test_every_module_is_in_a_layer():
    assert {unit_of(m) for m in zili_sources()} <= set(LAYER_OF)


def test_layers_import_one_way():
    assert upward_edges(zili_sources()) == []


def test_an_upward_import_is_caught_even_inside_a_function():
    sources = zili_sources()
    sources["zili.parallel.apply"] += "\n\ndef _loss():\n    from zili.train.step import lm_loss\n    return lm_loss\n"
    sources["zili.models.args"] += "\nimport zili.config\n"
    sources["zili.bench.measure"] += "\nfrom zili.plan import memory\n"  # same layer, another unit
    assert upward_edges(sources) == ["zili.bench.measure -> zili.plan.memory", "zili.models.args -> zili.config",
                                     "zili.parallel.apply -> zili.train.step"]
