"""Checkpoints written in the background (`checkpoint.async_save = true`): the state is copied to host memory
while training waits (DCP's `async_save` stages it), then written, hashed and committed by a background thread
while training goes on.

The same checkpoint as `zili.checkpoint.save` writes — temporary directory, manifest last, rename, retention — so
it is never visible before it is complete, and a failure (a full disk) removes the temporary directory and leaves
the earlier checkpoints as they were. The collectives of the background part (DCP's planning, the agreement on
failures) run on a gloo group of their own (`checkpoint_group`), never on the group the training steps use.

At most one save is in flight: `BackgroundSaver.save` first waits for the previous one. The trainer waits for the
last one before it returns (end of the run, a stop signal, exit_after); an error of a background save — a full
disk — is raised by the next `save` or `wait`, on every rank alike.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from zili import checkpoint
from zili.checkpoint import _attempt, _begin, _finish, _is_writer, _quiet, _settle


def checkpoint_group():
    """A gloo group over all ranks for background saves (collective: every rank calls it); None in one process.
    DCP's async save needs a CPU backend, and its own collectives must not interleave with the training's."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


class BackgroundSaver:
    """One save in flight at most (module doc)."""

    def __init__(self, group=None):
        self.group = group
        if group is None:  # one process: DCP's "assuming the intent is to save in a single process", from the thread
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: Path | None = None

    def save(self, run_dir: Path, step: int, parts, optimizers, trainer_state: dict[str, torch.Tensor], meta: dict,
             keep: int) -> None:
        """Stage checkpoint `step` to host memory now (collective; a non-finite state is refused here, writing
        nothing) and write it in the background."""
        self.wait()
        checkpoint.check_finite(parts, optimizers)
        state = checkpoint.full_state(parts, optimizers, trainer_state)
        tmp = _begin(run_dir, step)
        upload = []

        def stage() -> None:
            with _quiet():
                response = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            # a Future; newer DCP may answer with an AsyncSaveResponse holding the upload's future
            upload.append(getattr(response, "upload_completion", response))

        _settle(_attempt(stage), run_dir, step, tmp)

        def write() -> None:
            try:
                _settle(_attempt(lambda: upload[0].result()), run_dir, step, tmp, self.group)
                final = _finish(run_dir, step, meta, tmp, self.group)
                if _is_writer():
                    checkpoint.retain(run_dir, final, keep)
                self._done = final
            except BaseException as e:  # raised again in the training thread by wait()
                self._error = e

        # a daemon: a run that fails in its training thread is not kept alive by a save that cannot finish
        self._thread = threading.Thread(target=write, name=f"zili-checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is committed; its directory, or None. Raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        done, self._done = self._done, None
        return done

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
