"""Checkpoints through torch.distributed.checkpoint (DCP): atomic, complete-only, with retention.

Layout: RUN_DIR/checkpoints/step-NNNNNNN/ holds the DCP files (`.metadata`, `*.distcp`), `meta.json`
(step, model architecture, the data trained on) and, written last, `manifest.json` (every other file's path,
size and sha256: zili.checkpoint.manifest). A checkpoint is written into a hidden temporary directory next to
it and renamed into place only when every file is written, so a `step-*` directory is complete when written;
a failed save (a full disk ...) removes its temporary directory and leaves the earlier checkpoints as they were.

Verified on use: `resolve` and `latest` pick the newest checkpoint whose files all match its manifest, skipping
damaged ones with a one-line warning on stderr. A checkpoint written before manifests (meta.json names none)
is used unverified, with a warning. Under torch.distributed rank 0 verifies and the others take its choice.

DCP's `.metadata` is a pickle, which DCP unpickles on load: a checkpoint is trusted input, like any
torch.save file. Weights for strangers go through `zili export-hf` (safetensors).

State saved: `model` and `optim` (fully-qualified-name keyed, via torch.distributed.checkpoint.state_dict;
the optimizer state flattened to `state.<param name>.<key>` entries), and `trainer`: a flat dict of tensors
(step, loader position, RNG states). Every rank writes its shards of the DTensors; DCP reshards on load, so
a checkpoint written under one parallel layout (world size, dp/tp/pp degrees, any split of the model into
pipeline stages) loads under any other. zili pickles nothing of its own (DCP's `.metadata` aside, above).

`parts` and `optimizers` are lists: the model part(s) on this rank (several with interleaved pipeline
stages) and one optimizer per part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable
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

from zili.checkpoint import manifest
from zili.errors import UserError
from zili.fsio import commit_dir, temp_dir_for
from zili.models.args import ModelArgs
from zili.parallel import distributed

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


def _step_of(path: Path) -> int | None:
    """N of a `step-NNNNNNN` directory name; None for any other name."""
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def step_dirs(run_dir: Path) -> list[Path]:
    """Every `step-NNNNNNN` directory of a run, intact or not, oldest first (the hidden temporary ones of a save
    in progress or interrupted are not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoints of a run (meta.json and .metadata present; not verified), oldest first."""
    return [p for p in step_dirs(run_dir) if (p / "meta.json").is_file() and (p / ".metadata").is_file()]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verify` found in checkpoint `path`: `problem` None when it is usable; `verified` False for a checkpoint
    written before manifests existed (usable, its files unchecked)."""

    path: Path
    problem: str | None
    verified: bool = True

    @property
    def usable(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        """One line: `step-NNNNNNN: ok`, `... ok (unverified: ...)` or `... DAMAGED: what`."""
        if self.problem:
            return f"{self.path.name}: DAMAGED: {self.problem}"
        return f"{self.path.name}: ok" + ("" if self.verified else " (unverified: written before checkpoints had a "
                                                                     "manifest.json)")


def verify(path: Path, checksums: bool = True) -> Verdict:
    """Check checkpoint `path` against its manifest: every file present, with its size and (with `checksums`) its
    sha256. A checkpoint without manifest.json whose meta.json names none was written before manifests: usable
    if meta.json and .metadata are there (`verified` False). Reads every byte with `checksums` (about 1 s/GiB on
    one core), only directory entries without. Never raises."""
    path = Path(path)
    if (path / manifest.MANIFEST).exists():
        return Verdict(path, manifest.problem(path, checksums))
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return Verdict(path, "meta.json and manifest.json are missing")
    except (OSError, ValueError) as e:
        return Verdict(path, f"meta.json is unreadable ({e.__class__.__name__}) and manifest.json is missing")
    if not isinstance(meta, dict) or meta.get("manifest"):
        return Verdict(path, f"{manifest.MANIFEST} is missing")
    if not (path / ".metadata").is_file():
        return Verdict(path, ".metadata is missing", verified=False)
    return Verdict(path, None, verified=False)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _pick(run_dir: Path, step: int | None = None) -> Path | None:
    """The newest usable checkpoint of the run (that of `step` if given; None if the run has no checkpoint at all),
    after a one-line warning for each damaged one skipped or one used unverified; UserError if none is usable or
    step `step` is damaged (a step asked for is never silently replaced by another)."""
    found = step_dirs(run_dir)
    root = Path(run_dir) / "checkpoints"
    if step is not None:
        found = [p for p in found if _step_of(p) == step]
        if not found:
            raise UserError(f"no checkpoint for step {step} in {root} — pick one of "
                            f"{', '.join(str(_step_of(p)) for p in step_dirs(run_dir)) or 'none (train first)'}")
    skipped = []
    for path in reversed(found):
        verdict = verify(path)
        if not verdict.usable:
            skipped.append(verdict)
            continue
        if step is None:
            for bad in skipped:
                _warn(f"checkpoint {bad.path} is damaged ({bad.problem}) — skipped; using {path.name}")
        if not verdict.verified:
            _warn(f"checkpoint {path} has no manifest.json (written before zili checked checkpoints) — using it "
                  "without checking its files")
        return path
    if not found:
        return None
    if step is not None:
        raise UserError(f"checkpoint {skipped[0].path} is damaged ({skipped[0].problem}) — pick another step "
                        "(`zili checkpoint verify RUN_DIR` lists the intact ones)")
    damaged = "; ".join(f"{v.path.name}: {v.problem}" for v in skipped[:3]) + ("; …" if len(skipped) > 3 else "")
    raise UserError(f"no intact checkpoint in {root} ({damaged}) — restore it from a copy, or start a new run_dir "
                    "(`zili checkpoint verify RUN_DIR` lists what is wrong)")


def _on_rank0(decide: Callable[[], Path | None], located: Callable[[int], Path]) -> Path | None:
    """`decide()` — a checkpoint directory, or None — run on rank 0 alone, its answer on every rank through one
    all-reduce of a number (`located(step)` rebuilds the path there); its error raised on every rank (the CLI
    prints rank 0's). Every rank must load the same checkpoint, and N ranks need not hash the same files."""
    if not dist.is_initialized():
        return decide()
    path, error, code = None, None, 0  # code: -1 failed, 0 none, 1 + step
    if _is_writer():
        try:
            path = decide()
            code = 0 if path is None else 1 + (_step_of(path) or 0)
        except Exception as e:  # told to the other ranks first, then raised
            error, code = e, -1
    code = int(distributed.all_reduce(torch.tensor(code, dtype=torch.int64)))
    if error is not None:
        raise error
    if code < 0:
        raise UserError("rank 0 found no usable checkpoint — see its error")
    return path if _is_writer() else (located(code - 1) if code else None)


def latest(run_dir: Path) -> Path | None:
    """The newest usable checkpoint of the run (see `_pick`), None if it has none yet. Collective under
    torch.distributed (rank 0 verifies)."""
    return _on_rank0(lambda: _pick(run_dir), lambda step: step_dir(run_dir, step))


def resolve(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step` (the newest usable one if None), verified (see `_pick`); UserError if there is
    none. Collective under torch.distributed (rank 0 verifies)."""
    path = _on_rank0(lambda: _pick(run_dir, step), lambda found: step_dir(run_dir, found))
    if path is None:
        raise UserError(f"no complete checkpoint in {Path(run_dir) / 'checkpoints'} — "
                        "train first, or pass a run directory that has one")
    return path


def require_usable(path: Path) -> Path:
    """`path` itself if `verify` finds it usable (warning if unverified), else a UserError saying what is wrong.
    Collective under torch.distributed (rank 0 verifies)."""
    path = Path(path)

    def decide() -> Path:
        verdict = verify(path)
        if not verdict.usable:
            raise UserError(f"checkpoint {path} is damaged ({verdict.problem}) — pass another one, or "
                            "--checkpoint.resume=auto for the newest intact one")
        if not verdict.verified:
            _warn(f"checkpoint {path} has no manifest.json (written before zili checked checkpoints) — using it "
                  "without checking its files")
        return path

    return _on_rank0(decide, lambda _: path)


def check_same_data(path: Path, data: dict | None) -> None:
    """UserError naming what differs between the data checkpoint `path` was trained on (its meta.json `data`) and
    `data` now (`{"dataset": fingerprint, "path", "seq_len", "val_fraction", "seed", ...}`): the loader's position
    counts sequences of that dataset, cut at that seq_len, split off the validation share at that val_fraction and
    shuffled by that seed — under any other it would repeat some sequences and skip others. Not checked for a
    checkpoint from before the data was recorded or a run without a token dataset (grpo)."""
    saved = read_meta(path).get("data")
    if not saved or not data:
        return
    changed = []
    if saved.get("dataset") != data["dataset"]:
        was, now = saved.get("path", "?"), data["path"]
        fingerprints = f"content {str(saved.get('dataset'))[:12]} then, {data['dataset'][:12]} now"
        changed.append(f"data.dataset {now} ({fingerprints})" if was == now else
                       f"data.dataset {now} (it trained on {was}; {fingerprints})")
    for key, name in (("seq_len", "training.seq_len"), ("val_fraction", "data.val_fraction"),
                      ("seed", "training.seed")):
        if key in saved and saved[key] != data[key]:
            changed.append(f"{name}={data[key]!r} (it trained with {saved[key]!r})")
    if changed:
        raise UserError(f"checkpoint {path} was trained on other data: {', '.join(changed)} — resume with the "
                        "original dataset, seq_len, val_fraction and seed, or start a new run_dir")


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


_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`, if any (DCP wraps every rank's failure in one CheckpointException)."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, CheckpointException):
        return next((e for e, _ in error.failures.values() if isinstance(e, OSError)), None)
    return None


def _attempt(action: Callable[[], object]) -> BaseException | None:
    try:
        action()
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        return e
    return None


def _agree(code: int, group) -> int:
    """The largest `code` over the ranks: on the default group, or on `group` (a CPU group: a background save's)."""
    if group is None or not dist.is_initialized():
        return int(distributed.all_reduce(torch.tensor(code, dtype=torch.int64), op="max"))
    value = torch.tensor([code], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value)


def _settle(error: BaseException | None, run_dir: Path, step: int, tmp: Path, group=None) -> None:
    """After one phase of a save on every rank: if it failed on any rank, remove the temporary directory (rank 0)
    and raise on every rank — a UserError for a full disk or another I/O error, else the error itself. One
    all-reduce (on `group` if given), so that no rank waits for a peer that gave up."""
    failure = _os_error(error)
    code = 0 if error is None else 1 if failure is None else 3 if failure.errno in _FULL else 2
    worst = _agree(code, group)
    if not worst:
        return
    if _is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
    done = [p for p in step_dirs(run_dir) if verify(p, checksums=False).usable]  # the failed save touched none
    intact = f"the previous checkpoint {done[-1].name} is intact" if done else "no earlier checkpoint exists"
    where = f"writing checkpoint step {step} to {tmp.parent}"
    if worst == 3:
        raise UserError(f"no space left on device {where} — free space there (or lower checkpoint.keep), then "
                        f"resume with --checkpoint.resume=auto; {intact}")
    if worst == 2 and failure is not None:
        raise UserError(f"{where} failed ({failure.__class__.__name__}: {failure.strerror or failure}) — fix the "
                        f"filesystem, then resume with --checkpoint.resume=auto; {intact}")
    if error is not None:
        raise error
    if worst == 2:
        raise UserError(f"{where} failed on another rank (an I/O error there) — {intact}")
    raise RuntimeError(f"{where} failed on another rank (see its error); {intact}")


def _hash_share(tmp: Path) -> list[dict]:
    """Manifest entries of the files of `tmp` this rank hashes: the DCP files it wrote (still in its page cache);
    rank 0 also every other file (.metadata, meta.json, a file whose writer is unknown)."""
    rank, world = distributed.rank(), dist.get_world_size() if dist.is_initialized() else 1
    names = []
    for name in manifest.data_files(tmp):
        writer = manifest.writer_rank(name)
        owner = writer if writer is not None and writer < world else 0
        if owner == rank:
            names.append(name)
    return [manifest.describe(tmp, name) for name in names]


def _write(run_dir: Path, step: int, state: dict, meta: dict) -> Path:
    """DCP-save `state` into a temporary directory, add meta.json and, last, manifest.json, then rename it to
    step-NNNNNNN. Collective under torch.distributed: every rank writes its shards and hashes them (a manifest
    part each); rank 0 creates the directory, hashes the other files, merges the parts and commits. A failure on
    any rank removes the temporary directory and raises on every rank (`_settle`): the earlier checkpoints stay."""
    tmp = _begin(run_dir, step)

    def save_state() -> None:
        with _quiet():
            dcp.save(state, checkpoint_id=str(tmp))  # collective; a failure on any rank raises on all of them

    _settle(_attempt(save_state), run_dir, step, tmp)
    return _finish(run_dir, step, meta, tmp)


def _begin(run_dir: Path, step: int) -> Path:
    """The fresh temporary directory of checkpoint `step` (rank 0 creates it; collective)."""
    tmp = step_dir(run_dir, step).with_name(f".tmp-{step_dir(run_dir, step).name}")
    _settle(_attempt(lambda: temp_dir_for(step_dir(run_dir, step))) if _is_writer() else None, run_dir, step, tmp)
    return tmp


def _finish(run_dir: Path, step: int, meta: dict, tmp: Path, group=None) -> Path:
    """After the DCP files are in `tmp`: meta.json, the manifest (each rank hashes what it wrote), the rename.
    Collective on `group` (default: the default group)."""
    final = step_dir(run_dir, step)
    writer = _is_writer()
    own: list[dict] = []

    def describe() -> None:
        if writer:  # meta.json before hashing: it is listed too; `manifest` tells a lost manifest from an old one
            manifest.write_json(tmp / "meta.json", {"step": step, **meta, "manifest": manifest.MANIFEST})
        own.extend(_hash_share(tmp))
        if not writer:
            manifest.write_part(tmp, distributed.rank(), own)

    _settle(_attempt(describe), run_dir, step, tmp, group)

    def commit() -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        entries = own + manifest.merge_parts(tmp, range(1, world))
        covered = {entry["path"] for entry in entries}  # a rank's stale listing may have missed a file: hash it here
        entries += [manifest.describe(tmp, name) for name in manifest.data_files(tmp) if name not in covered]
        manifest.write(tmp, entries)
        commit_dir(tmp, final)

    _settle(_attempt(commit) if writer else None, run_dir, step, tmp, group)
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


def retain(run_dir: Path, newest: Path, keep: int) -> list[Path]:
    """Delete old checkpoints, keeping `newest` (the one just written) and the `keep - 1` newest older ones that
    look intact — every file of their manifest there, with its size (no checksums: that would read them all at
    every save). A damaged one never counts, so `keep` intact ones stay whenever that many exist; a damaged one
    newer than the oldest kept stays until it ages out. Checkpoints newer than `newest` (left from before a resume
    that went back past them) are left alone. Returns the deleted directories."""
    older = [p for p in reversed(step_dirs(run_dir)) if _step_of(p) < _step_of(newest)]
    kept = [p for p in older if verify(p, checksums=False).usable][: max(keep - 1, 0)]
    oldest = _step_of(kept[-1]) if kept else _step_of(newest)
    doomed = [p for p in older if _step_of(p) < oldest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def full_state(parts, optimizers, trainer_state: dict[str, torch.Tensor]) -> dict:
    """What a training checkpoint holds: {"model", "optim", "trainer"} (module doc)."""
    model_sd, optim_sd = {}, {}
    for model_part, optim_part in _part_states(parts, optimizers):
        model_sd.update(model_part)
        optim_sd.update(optim_part)
    return {"model": model_sd, "optim": optim_sd, "trainer": trainer_state}


def save(run_dir: Path, step: int, parts, optimizers, trainer_state: dict[str, torch.Tensor], meta: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically with its manifest, then delete old ones (`retain`: `keep` intact ones
    stay). Refuses (UserError) a state with a non-finite value, writing nothing; a full disk is a UserError, the
    temporary directory removed and the earlier checkpoints intact. Collective under torch.distributed."""
    check_finite(parts, optimizers)
    final = _write(run_dir, step, full_state(parts, optimizers, trainer_state), meta)
    if _is_writer():
        retain(run_dir, final, keep)
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
