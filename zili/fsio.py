"""Files and directories written atomically: into a temporary path next to the final one, then renamed into
place, so a reader (or a resumed run) never sees a half-written result — the one helper for it in zili.

Renames are atomic within one filesystem; the temporary path is a hidden sibling of the final one, so it is
on the same filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from zili.errors import UserError


def check_writable(path: Path, what: str) -> None:
    """UserError naming `what` unless `path` can be created here, before any work is done: its nearest existing
    ancestor must be a directory this process may write into (a file in the way and a read-only directory are
    the user's to fix; both would otherwise fail, with a traceback, at the end)."""
    path = Path(path).absolute()
    ancestor = next(p for p in path.parents if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} cannot be created: {ancestor} is a file, not a directory — pick another place")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be created: {ancestor} is not writable — pick a directory you can "
                        "write to")


def temp_dir_for(final: Path) -> Path:
    """A fresh (emptied) hidden directory next to `final`: `.tmp-NAME`. The same name on every process, so
    several ranks can write into it before one of them commits."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> Path:
    """Replace `final` (if any) by the complete directory `tmp`."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    Path(tmp).rename(final)
    return final


@contextlib.contextmanager
def atomic_dir(final: Path):
    """`with atomic_dir(final) as tmp:` write into `tmp`; on success it becomes `final`, on error it is removed."""
    tmp = temp_dir_for(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a process-private temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
