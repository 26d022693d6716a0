"""Start the ranks of one `zili train` launch as forked children of one process that imported zili once.

Each rank is a real process that runs what `python -m zili train ARGS` runs (`zili.cli.main`), with the
environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), and joins the
others with gloo; it only skips starting Python and importing torch and zili itself — seconds of CPU per rank
on a 2-core machine, the larger part of a tiny test run. The launch through torchrun and `python -m zili`
itself is tested by tests/distributed/test_parity.py::test_torchrun_launch_fsdp2_matches_single_process.

    python fork_ranks.py OUT_DIR N PORT -- ARGS...

writes OUT_DIR/import.out and import.err (what importing printed, which a real rank would have printed too),
and per rank OUT_DIR/rank{R}.out, rank{R}.err and rank{R}.rc (its exit code, as the shell reports it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _redirect(stdout: Path, stderr: Path) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)


def main() -> None:
    out, n, port = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    args = sys.argv[sys.argv.index("--") + 1:]
    _redirect(out / "import.out", out / "import.err")
    import zili.train.trainer  # noqa: F401  (what `zili train` imports, once for all ranks)
    from zili.cli import main as zili_main

    ranks = {}
    for rank in range(n):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the rank: from here on as `python -m zili train ARGS` would run
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            _redirect(out / f"rank{rank}.out", out / f"rank{rank}.err")
            sys.argv = [str(Path(zili.__file__).parent / "__main__.py"), "train", *args]
            zili_main(["train", *args])
            sys.exit(0)  # an exception or SystemExit ends the rank the way it ends `python -m zili`
        ranks[pid] = rank
    while ranks:
        pid, status = os.wait()
        (out / f"rank{ranks.pop(pid)}.rc").write_text(str(os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    main()
