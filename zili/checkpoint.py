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
import dataclasses
import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from zili.errors import UserError
from zili.fsio import commit_dir, temp_dir_for
from zili.models.args import ModelArgs

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


def check_compatible(path: Path, model_args: dict) -> None:
    """UserError naming the architecture fields where checkpoint `path` differs from `model_args`."""
    saved = read_meta(path).get("model", {})
    defaults = {f.name: f.default for f in dataclasses.fields(ModelArgs)}  # for keys older checkpoints lack
    differ = [f"{k}={saved.get(k, defaults.get(k))!r} (now {v!r})" for k, v in model_args.items()
              if saved.get(k, defaults.get(k)) != v]
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
    found = [p for p in root.iterdir()
             if p.name.startswith(PREFIX) and (p / "meta.json").is_file() and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step` (newest if None); UserError if there is none."""
    found = list_checkpoints(run_dir)
    if step is not None:
        found = [p for p in found if p.name == step_dir(run_dir, step).name]
    if not found:
        what = f"checkpoint for step {step}" if step is not None else "complete checkpoint"
        raise UserError(f"no {what} in {Path(run_dir) / 'checkpoints'} — "
                        "train first, or pass a run directory that has one")
    return found[-1]


def read_meta(path: Path) -> dict:
    """The checkpoint's meta.json (step, model architecture, ...); UserError if missing or damaged."""
    file = Path(path) / "meta.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file} not found — {path} is not a complete zili checkpoint") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read ({e.__class__.__name__}) — the checkpoint is damaged") from None


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _flat_keys(state: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"a.w": t}} -> {"model.a.w": t}: DCP's names for the entries of a nested state dict."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no .metadata file — it is incomplete: pick another step") from None
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # DCP's own format
        raise UserError(f"checkpoint {path}/.metadata cannot be read ({e.__class__.__name__}: {e}) — the file is "
                        "damaged: pick another step") from None


def saved_tensors(path: Path, prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor the checkpoint at `path` holds under `prefix` (e.g. "trainer."), keyed by
    the name after the prefix; a missing or damaged .metadata is a UserError."""
    out = {}
    for key, entry in _read_metadata(path).state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata):
            out[key.removeprefix(prefix)] = (tuple(entry.size), entry.properties.dtype)
    return out


def _load(path: Path, state: dict) -> None:
    """dcp.load `state` in place from `path`, first checking that every entry exists with the same shape;
    a missing or unreadable file is reported as such (UserError); anything else (out of memory ...) raises."""
    metadata = _read_metadata(path).state_dict_metadata
    for key, value in _flat_keys(state).items():
        if key not in metadata:
            raise UserError(f"checkpoint {path} has no {key!r} — it was written for another model or optimizer: "
                            "resume with the config it was written with")
        saved = metadata[key]
        if isinstance(value, torch.Tensor) and isinstance(saved, TensorStorageMetadata) and \
                tuple(saved.size) != tuple(value.shape):
            raise UserError(f"checkpoint {path}: {key!r} has shape {tuple(saved.size)} there but {tuple(value.shape)} "
                            "here — resume with the model config it was written with")
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's failure in a BaseException
        cause = _io_cause(e)
        if cause is None:
            raise
        raise UserError(f"checkpoint {path}: a data file is missing or unreadable ({cause}) — the checkpoint is "
                        "damaged: pick another step") from None


def _io_cause(error: BaseException) -> str | None:
    """The I/O error behind a DCP failure (DCP wraps each rank's exception), as text; None if not I/O."""
    text = str(error)
    for kind in ("FileNotFoundError", "PermissionError", "IsADirectoryError", "OSError", "EOFError",
                 "UnpicklingError", "SafetensorError"):
        if kind in text:
            line = next((ln.strip() for ln in text.splitlines() if kind in ln), kind)
            return line[:200]
    if isinstance(error, OSError):
        return f"{error.__class__.__name__}: {error}"[:200]
    return None


def _part_states(parts, optimizers) -> list[tuple[dict, dict]]:
    return [(get_model_state_dict(part), get_optimizer_state_dict(part, opt, options=FLAT))
            for part, opt in zip(parts, optimizers)]


def _write(run_dir: Path, step: int, state: dict, meta: dict) -> Path:
    """DCP-save `state` into a temporary directory with meta.json, then rename it to step-NNNNNNN.
    Collective under torch.distributed (every rank writes its shards; rank 0 creates and commits)."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if _is_writer():
        temp_dir_for(final)
    _barrier()
    with _quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    if _is_writer():
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        commit_dir(tmp, final)
    return final


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def check_finite(parts, optimizers) -> None:
    """UserError naming a parameter (or optimizer state) that is not finite on any rank: a checkpoint never
    holds one. One reduction over all ranks; collective under torch.distributed."""
    tensors = [(name, _local(p)) for part in parts for name, p in part.named_parameters()]
    tensors += [(f"optimizer state of {name}", _local(v)) for part, opt in zip(parts, optimizers)
                for name, p in part.named_parameters() for v in opt.state.get(p, {}).values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
    flags = torch.stack([~torch.isfinite(t).all() for _, t in tensors]).float() if tensors else torch.zeros(1)
    anywhere = flags.max().reshape(1)  # ranks hold different numbers of tensors (pipeline stages): reduce one
    if dist.is_initialized():
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    if bool(anywhere):
        name = tensors[int(flags.argmax())][0] if bool(flags.max()) else "a parameter on another rank"
        raise UserError(f"{name} is not finite — refusing to write a checkpoint of a broken state; the previous "
                        "checkpoints are kept: resume from the last one with a lower optimizer.lr")


def save(run_dir: Path, step: int, parts, optimizers, trainer_state: dict[str, torch.Tensor], meta: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. Refuses (UserError) a state
    with a non-finite value, writing nothing. Collective under torch.distributed."""
    check_finite(parts, optimizers)
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


def load(path: Path, parts, optimizers, trainer_state: dict[str, torch.Tensor],
         optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Load model, optimizer and trainer state from `path` in place, resharding to this layout;
    `trainer_state` gives the keys and shapes expected and is returned filled — without the `optional` keys
    the checkpoint lacks (state added since older checkpoints were written)."""
    states = _part_states(parts, optimizers)
    model_sd = {k: v for model_part, _ in states for k, v in model_part.items()}
    optim_sd = {k: v for _, optim_part in states for k, v in optim_part.items()}
    saved = _read_metadata(path).state_dict_metadata
    trainer_state = {k: v for k, v in trainer_state.items() if k not in optional or f"trainer.{k}" in saved}
    state = {"model": model_sd, "optim": optim_sd, "trainer": trainer_state}
    _load(path, state)
    for part, opt, (model_part, optim_part) in zip(parts, optimizers, states):
        # DCP fills tensors in place but replaces plain values (learning rates ...): read back from `state`
        set_model_state_dict(part, {k: state["model"][k] for k in model_part})
        set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in optim_part}, options=FLAT)
    return state["trainer"]


def load_model(path: Path, model) -> None:
    """Load only the model weights from `path` (for inference and export)."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    _load(path, state)
    set_model_state_dict(model, state["model"])


class CheckpointWeights:
    """A checkpoint's model weights as starting values (`zili.parallel.init.init_weights`' `initial_value`):
    `weights(name, shape, offsets=None, sizes=None)` -> the fp32 region full[offsets : offsets + sizes] of tensor
    `name` (all of it by default). Each call reads the whole tensor (DCP reads only its bytes) and slices it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, name: str, shape, offsets=None, sizes=None) -> torch.Tensor:
        full = read_model_tensor(self.path, name, tuple(shape))
        if offsets is None or sizes is None:
            return full
        return full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].clone()


def read_model_tensor(path: Path, name: str, shape) -> torch.Tensor:
    """Parameter `name` of checkpoint `path` as an fp32 tensor of `shape`, read alone (DCP reads only its
    bytes, whatever number of ranks wrote it) — for streaming conversions."""
    tensor = torch.empty(shape, dtype=torch.float32)
    _load(path, {"model": {name: tensor}})
    return tensor
