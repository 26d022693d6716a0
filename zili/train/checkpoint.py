"""Checkpoints through torch.distributed.checkpoint (DCP): atomic, complete-only, with retention.

Layout: RUN_DIR/checkpoints/step-NNNNNNN/ holds the DCP files (`.metadata`, `*.distcp`) and `meta.json`
(step, model architecture). A checkpoint is written into a hidden temporary directory next to it and
renamed into place only when every file is written, so a `step-*` directory is always complete.

State saved: `model` and `optim` (fully-qualified-name keyed, via torch.distributed.checkpoint.state_dict;
the optimizer state flattened to `state.<param name>.<key>` entries), and `trainer`: a flat dict of tensors
(step, loader position, RNG states). Every rank writes its shards of the DTensors; DCP reshards on load, so
a checkpoint written under one parallel layout (world size, dp/tp/pp degrees, any split of the model into
pipeline stages) loads under any other. Nothing is pickled, nothing is unpickled on load.

`parts` and `optimizers` are lists: the model part(s) on this rank (several with interleaved pipeline
stages) and one optimizer per part.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from zili.errors import UserError

PREFIX = "step-"


@contextlib.contextmanager
def _quiet():
    """DCP warns when no process group exists; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "Error" in line or "mismatch" in line]
    return (lines[-1] if lines else str(error).strip().splitlines()[0])[:200]


def check_compatible(path: Path, model_args: dict) -> None:
    """UserError naming the architecture fields where checkpoint `path` differs from `model_args`."""
    saved = read_meta(path).get("model", {})
    differ = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in model_args.items() if saved.get(k) != v]
    if differ:
        raise UserError(f"checkpoint {path} was written for another model: {', '.join(differ)} — "
                        "resume with the model config it was trained with, or start a new run_dir")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "meta.json").is_file() and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step` (newest if None); UserError if there is none."""
    found = list_checkpoints(run_dir)
    if step is not None:
        found = [p for p in found if p.name == step_dir(run_dir, step).name]
    if not found:
        what = f"checkpoint for step {step}" if step is not None else "complete checkpoint"
        raise UserError(f"no {what} in {Path(run_dir) / 'checkpoints'} — train first, or pass a run directory that has one")
    return found[-1]


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _part_states(parts, optimizers) -> list[tuple[dict, dict]]:
    return [(get_model_state_dict(part), get_optimizer_state_dict(part, opt, options=FLAT))
            for part, opt in zip(parts, optimizers)]


def _write(run_dir: Path, step: int, state: dict, meta: dict) -> Path:
    """DCP-save `state` into a temporary directory with meta.json, then rename it to step-NNNNNNN.
    Collective under torch.distributed (every rank writes its shards; rank 0 creates and commits)."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if _is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    if _is_writer():
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return final


def save(run_dir: Path, step: int, parts, optimizers, trainer_state: dict[str, torch.Tensor], meta: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. Collective under torch.distributed."""
    model_sd, optim_sd = {}, {}
    for model_part, optim_part in _part_states(parts, optimizers):
        model_sd.update(model_part)
        optim_sd.update(optim_part)
    final = _write(run_dir, step, {"model": model_sd, "optim": optim_sd, "trainer": trainer_state}, meta)
    if _is_writer():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save_model(run_dir: Path, step: int, model, meta: dict) -> Path:
    """Write a weights-only checkpoint (no optimizer or trainer state; e.g. an imported model), atomically."""
    return _write(run_dir, step, {"model": get_model_state_dict(model)}, meta)


def load(path: Path, parts, optimizers, trainer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load model, optimizer and trainer state from `path` in place, resharding to this layout;
    `trainer_state` gives the keys and shapes expected and is returned filled."""
    states = _part_states(parts, optimizers)
    model_sd = {k: v for model_part, _ in states for k, v in model_part.items()}
    optim_sd = {k: v for _, optim_part in states for k, v in optim_part.items()}
    state = {"model": model_sd, "optim": optim_sd, "trainer": trainer_state}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP raises many kinds for a mismatched checkpoint
        raise UserError(f"checkpoint {path} does not fit this model/optimizer ({_first_line(e)}) — "
                        "resume with the config it was written with") from None
    for part, opt, (model_part, optim_part) in zip(parts, optimizers, states):
        # DCP fills tensors in place but replaces plain values (learning rates ...): read back from `state`
        set_model_state_dict(part, {k: state["model"][k] for k in model_part})
        set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in optim_part}, options=FLAT)
    return state["trainer"]


def load_model(path: Path, model) -> None:
    """Load only the model weights from `path` (for inference and export)."""
    model_sd = get_model_state_dict(model, options=StateDictOptions())
    state = {"model": model_sd}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise UserError(f"checkpoint {path} does not fit this model ({_first_line(e)})") from None
    set_model_state_dict(model, state["model"])


def read_model_tensor(path: Path, name: str, shape) -> torch.Tensor:
    """Parameter `name` of checkpoint `path` as an fp32 tensor of `shape`, read alone (DCP reads only its
    bytes, whatever number of ranks wrote it) — for streaming conversions."""
    tensor = torch.empty(shape, dtype=torch.float32)
    try:
        with _quiet():
            dcp.load({"model": {name: tensor}}, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        raise UserError(f"checkpoint {path} has no usable {name!r} ({_first_line(e)}) — "
                        "it was not written by this model") from None
    return tensor
