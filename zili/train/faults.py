"""Faults injected on purpose, for the tests of what zili does when a rank dies, hangs or is signalled.

The environment variable ZILI_FAULT holds one fault, `ACTION:RANK:STEP[:ARG]`, done by rank RANK right after
step STEP, in the first attempt of a torchrun job only (TORCHELASTIC_RESTART_COUNT 0 or unset), so a restarted
job runs through:
  kill:1:7        rank 1 sends itself SIGKILL (a crashed node)
  sleep:1:3:60    rank 1 sleeps 60 s (a hung rank; the others wait in their next collective)
  signal:1:4:TERM rank 1 sends itself SIGTERM (a preemption notice that reached one rank)
Unset, nothing happens. Not for production use.
"""

from __future__ import annotations

import os
import signal
import time

from zili.errors import UserError

ACTIONS = ("kill", "sleep", "signal")


def parse(spec: str) -> tuple[str, int, int, str]:
    """(action, rank, step, argument) of a ZILI_FAULT value; UserError if malformed."""
    parts = spec.split(":")
    if len(parts) < 3 or parts[0] not in ACTIONS or not parts[1].isdigit() or not parts[2].isdigit():
        raise UserError(f"ZILI_FAULT={spec!r} is not ACTION:RANK:STEP[:ARG] with ACTION one of {', '.join(ACTIONS)} "
                        "— unset it (it is for tests)")
    return parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""


def inject(step: int, rank: int) -> None:
    """Do the fault ZILI_FAULT names if it is for this rank and `step` (module doc)."""
    spec = os.environ.get("ZILI_FAULT")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):
        return
    action, at_rank, at_step, argument = parse(spec)
    if (at_rank, at_step) != (rank, step):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sleep":
        time.sleep(float(argument or 3600))
    else:
        os.kill(os.getpid(), getattr(signal, f"SIG{argument or 'TERM'}"))
