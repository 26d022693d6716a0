"""The runs a report shows: each run directory's metrics.jsonl records, its config.toml and a short name."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from zili.errors import UserError
from zili.train.metrics import read_metrics, scalars


@dataclass
class Run:
    name: str  # unique among the report's runs: the directory's name, or more of its path where names clash
    path: Path
    records: list[dict]  # metrics.jsonl, in order
    config: dict[str, object] | None  # "section.key" -> value from config.toml; None when the run has none

    def series(self, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        """Steps and values of the records where `key` is a finite number (nulls and absent fields left out)."""
        points = [(r["step"], value * scale) for r in self.records if (value := scalars(r).get(key)) is not None]
        return [s for s, _ in points], [v for _, v in points]


def read_config(path: Path) -> dict[str, object] | None:
    """config.toml flattened to "section.key" -> value; None when the file is absent."""
    if not path.is_file():
        return None
    try:
        tables = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}) — fix it or move it away") from None
    flat = {}
    for section, table in tables.items():
        if isinstance(table, dict):
            flat.update({f"{section}.{key}": value for key, value in table.items()})
        else:
            flat[section] = table
    return flat


def unique_names(paths: list[Path]) -> list[str]:
    """Each run's directory name; where two share one, as many trailing path parts as tell them apart."""
    parts = [p.resolve().parts for p in paths]
    names = []
    for mine in parts:
        for n in range(1, len(mine) + 1):
            tail = mine[-n:]
            if all(other[-n:] != tail for other in parts if other != mine):
                break
        names.append("/".join(tail))
    return names


def load_runs(run_dirs) -> list[Run]:
    """The runs in the order given. Raises UserError for a missing directory, a missing or damaged
    metrics.jsonl (naming file:line) or an unreadable config.toml, and for a run given twice."""
    paths = [Path(p) for p in run_dirs]
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: no such run directory — give directories `zili train` wrote "
                            "(training.run_dir)")
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{path} has no metrics.jsonl — is it a run directory? (`zili train` writes "
                            "metrics.jsonl there from its first logged step)")
    resolved = [p.resolve() for p in paths]
    twice = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise UserError(f"{twice} is given twice — name each run once")
    return [Run(name, path, read_metrics(path), read_config(path / "config.toml"))
            for name, path in zip(unique_names(paths), paths)]
