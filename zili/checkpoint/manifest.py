"""`manifest.json` of a checkpoint directory: every file's relative path, size and checksum, written last.

    {"format": 1, "files": [{"path": ".metadata", "bytes": 5120, "sha256": hex},
                            {"path": "__0_0.distcp", "bytes": 81920, "sha256": hex}, ...]}

`path` is relative to the checkpoint directory (POSIX separators), `bytes` the file's size in bytes, `sha256`
the hex SHA-256 of its content — `sha256sum` checks a file by hand. SHA-256 rather than BLAKE2b: both are in
the standard library, and on CPUs with SHA instructions (x86 since 2017-2019, Arm v8.2) hashlib's SHA-256 runs
about twice as fast (measured 1.2 s/GiB against 2.5 s/GiB on one core; docs/architecture.md).

Under torch.distributed every rank hashes the files it wrote (still in its page cache) into a hidden part file
`.manifest-rank<R>.json`; rank 0 hashes the rest, merges the parts into manifest.json and deletes them (see
zili.checkpoint). Plain files and the standard library only: this module knows nothing of torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
PART = ".manifest-rank{rank}.json"
_PART = re.compile(r"\.manifest-rank\d+\.json")
_DCP_SHARD = re.compile(r"__(\d+)_\d+\.distcp")  # DCP's FileSystemWriter names rank R's files __R_<i>.distcp


def data_files(directory: Path) -> list[str]:
    """Relative paths of every file under `directory` but the manifest and its parts, sorted."""
    directory = Path(directory)
    found = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    return sorted(name for name in found if name != MANIFEST and not _PART.fullmatch(name))


def writer_rank(name: str) -> int | None:
    """The rank that wrote DCP data file `name` by DCP's file naming; None for any other file. Only decides who
    hashes a file (the rank that wrote it reads it from its page cache), never whether it is hashed."""
    match = _DCP_SHARD.fullmatch(name)
    return int(match[1]) if match else None


def describe(directory: Path, name: str) -> dict:
    """{"path", "bytes", "sha256"} of file `name` under `directory`, read once in chunks (hashlib.file_digest)."""
    with open(Path(directory) / name, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()  # the bytes hashed
    return {"path": name, "bytes": size, "sha256": digest}


def write_json(path: Path, data) -> None:
    """Write `data` as JSON and flush it to the disk (fsync), so that a full disk shows here, not later."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_part(directory: Path, rank: int, entries: list[dict]) -> None:
    write_json(Path(directory) / PART.format(rank=rank), entries)


def merge_parts(directory: Path, ranks) -> list[dict]:
    """The entries of the part files of `ranks` in `directory`, which are deleted. Opened by name, not found by
    listing the directory: a shared filesystem may serve a stale listing to one client."""
    entries = []
    for rank in ranks:
        part = Path(directory) / PART.format(rank=rank)
        entries += json.loads(part.read_text(encoding="utf-8"))
        part.unlink()
    return entries


def write(directory: Path, entries: list[dict]) -> None:
    """Write `directory/manifest.json` listing `entries` (sorted by path)."""
    write_json(Path(directory) / MANIFEST, {"format": FORMAT, "files": sorted(entries, key=lambda e: e["path"])})


def problem(directory: Path, checksums: bool = True) -> str | None:
    """What is wrong with `directory` according to its manifest, in a few words — a missing or unreadable manifest,
    a listed file missing or of another size, or (with `checksums`) another content — or None if nothing is.
    Sizes are checked first, for every file (cheap); then checksums, up to 8 files at a time. Files the manifest
    does not list are ignored (DCP reads only the files its .metadata names, all of them listed)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            return f"{MANIFEST} has format {manifest.get('format')!r}, this zili reads {FORMAT}"
        files = [(e["path"], int(e["bytes"]), str(e["sha256"])) for e in manifest["files"]]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({e.__class__.__name__})"
    outside = [name for name, _, _ in files if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        return f"{MANIFEST} lists {outside[0]}, outside the checkpoint"
    wrong = []
    for name, size, _ in files:
        try:
            actual = (Path(directory) / name).stat().st_size
        except FileNotFoundError:
            wrong.append(f"{name} is missing")
            continue
        except OSError as e:
            wrong.append(f"{name} cannot be read ({e.__class__.__name__})")
            continue
        if actual != size:
            wrong.append(f"{name}: size {actual} != {size}")
    if wrong:
        return wrong[0] + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
    if not checksums:
        return None

    def mismatch(name: str, size: int, digest: str) -> str | None:
        try:
            entry = describe(directory, name)
        except OSError as e:
            return f"{name} cannot be read ({e.__class__.__name__}: {e.strerror or e})"
        if entry["bytes"] != size:  # changed while being read
            return f"{name}: size {entry['bytes']} != {size}"
        if entry["sha256"] != digest:
            return f"{name}: checksum mismatch (sha256 {entry['sha256'][:12]}… != {digest[:12]}…)"
        return None

    # several files at once (hashlib and file reads release the GIL): a checkpoint of N ranks has N or more files
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files), os.cpu_count() or 1))) as pool:
        found = [text for text in pool.map(lambda file: mismatch(*file), files) if text]
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "") if found else None
