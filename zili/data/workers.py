"""Tokenizing batches of documents, in this process or in worker processes, results in input order.

`tokenize(texts, tokenizer)` is the one tokenizing step. `WorkerPool` runs it in worker processes:
`put(batch)` hands a batch over and yields the results that are due, `drain()` the rest, in the order the
batches were put, so the output does not depend on the number of workers or their timing. At most
`IN_FLIGHT_PER_WORKER * workers` batches are in flight, which bounds memory.

Starting the workers takes seconds: they fork from a server process (multiprocessing's forkserver) that first
imports zili, hence torch (~2 s on one core). The pool starts them in a background thread, and until they are
up `put` tokenizes batches in this process (while nothing is pending, so the order holds); only then do the
batches go to the workers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from zili.data.shards import token_dtype
from zili.data.tokenizer import Tokenizer

IN_FLIGHT_PER_WORKER = 2  # one being tokenized, one waiting, so no worker idles while the next batch is read


def tokenize(texts: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(tokens of all texts, each followed by EOS, in the shard dtype; number of documents that had tokens).

    The shard dtype (uint16 for most vocabularies) also quarters what a worker sends back."""
    flat: list[int] = []
    count = 0
    eos = tokenizer.eos_id
    for ids in tokenizer.encode_batch(texts):
        if ids:
            flat.extend(ids)
            flat.append(eos)
            count += 1
    tokens = np.array(flat, dtype=np.int64)
    if tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < tokenizer.vocab_size:
        raise RuntimeError("the tokenizer produced an id outside [0, vocab_size)")
    return tokens.astype(token_dtype(tokenizer.vocab_size)), count


class WorkerPool:
    """`workers` processes tokenizing batches with `tokenizer`, in order (see the module docstring).

    Use as a context manager: leaving it stops the workers (after their current batch), also on an error."""

    def __init__(self, tokenizer: Tokenizer, workers: int):
        self._tokenizer = tokenizer
        self._limit = IN_FLIGHT_PER_WORKER * workers
        self._pending: deque[Future] = deque()
        self._pool: ProcessPoolExecutor | None = None
        context = _context()
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="zili-start-workers")
        self._starting = self._starter.submit(_start, context, tokenizer, workers)

    def put(self, batch: list[str]) -> Iterator[tuple[np.ndarray, int]]:
        """Hand `batch` over; yields the results now due (this batch's at once while the workers start)."""
        if self._pool is None and self._starting.done():
            self._pool = self._starting.result()  # raises if the workers could not start
        if self._pool is None:
            yield tokenize(batch, self._tokenizer)
            return
        self._pending.append(self._pool.submit(_tokenize_in_worker, batch))
        while len(self._pending) >= self._limit:
            yield self._pending.popleft().result()

    def drain(self) -> Iterator[tuple[np.ndarray, int]]:
        """The results of every batch still pending, in order."""
        while self._pending:
            yield self._pending.popleft().result()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self._starter.shutdown(wait=True)  # a start under way finishes, so that its processes can be stopped
        pool = self._pool
        if pool is None and self._starting.exception() is None:
            pool = self._starting.result()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context for the workers; a forkserver is started here, ignoring Ctrl-C."""
    # forkserver: workers fork from a clean process that has imported this module once, so they start fast and
    # inherit no threads or locks from this one (which may run Rust, Arrow or tqdm threads); spawn where
    # forkserver is missing (macOS and Windows have no fork-safe alternative)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
        # Ctrl-C reaches the whole process group: the server (importing torch for ~2 s) and the workers it forks
        # would each print a traceback. They inherit SIGINT ignored; this process handles it and stops them.
        # Signal dispositions can only be changed in the main thread, and a handler not installed from Python
        # (getsignal: None) could not be put back; otherwise the server starts as it is.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                signal.signal(signal.SIGINT, previous)
    return context


def _start(context: multiprocessing.context.BaseContext, tokenizer: Tokenizer, workers: int) -> ProcessPoolExecutor:
    """A process pool whose `workers` processes are running and hold the tokenizer."""
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,))
    try:
        # a trivial task per worker: submit() starts the processes, result() waits until they are up
        for ready in [pool.submit(os.getpid) for _ in range(workers)]:
            ready.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return pool


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    """Keep the tokenizer for this worker's batches; one Rust thread, as the processes are the parallelism."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(texts: list[str]) -> tuple[np.ndarray, int]:
    return tokenize(texts, _worker_tokenizer)
