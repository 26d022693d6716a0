"""Stopping on request: SIGTERM or SIGUSR1 (what Slurm's `--signal`, Kubernetes and torchrun send before they kill
a job) ask the run to finish its current step, write a checkpoint and exit 0; a second signal exits at once.

Every rank must stop after the same step — a checkpoint is a collective — although the signal may reach the ranks
at different moments (or only some of them). `StopRequest.agreed()` is called once per step on every rank: it
reduces the ranks' flags with a max, so the step after which any rank saw a signal is the one all stop after.
That is one tiny all-reduce (and host sync) per step under torchrun; a single process only reads a flag.

Under torchrun the signal reaches the launcher, which forwards it to its workers and kills them if they are still
running after its grace period (30 s by default): a checkpoint must fit in it (docs/multi-node.md).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from zili.parallel import distributed

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class StopRequest:
    """`install()` the handlers (from the main thread), `restore()` the previous ones when the loop ends."""

    def __init__(self):
        self.signal: int | None = None  # the first signal received, if any
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only: a trainer elsewhere is not preemptible
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:  # the second one: no checkpoint, no cleanup
            print(f"{name} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum
        print(f"{name} received: finishing this step and writing a checkpoint (send it again to exit at once)",
              file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal (collective under torchrun: call it on all)."""
        mine = torch.tensor(float(self.signal is not None))
        if distributed.env_world_size() > 1:
            return bool(distributed.all_reduce(mine, op="max"))
        return bool(mine)
