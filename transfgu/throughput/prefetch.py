"""Prefetch and background writes: the host's part of a stage overlapped with the model's.

A stage that decodes, computes and writes one shard after the other costs ``sum(decode) + sum(model) +
sum(write)``; with the next shard decoded on a background thread (:class:`Prefetcher`) and the previous one written
on another (:class:`BackgroundWriter`), it costs about ``max(decode, model, write)`` per shard (:func:`overlapped`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
L = TypeVar("L")
R = TypeVar("R")


_DONE = object()


def _put(q: queue.Queue[Any], stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(it: Iterator[Any], q: queue.Queue[Any], stop: threading.Event) -> None:
    # A plain function (not a bound method): the thread must not keep the Prefetcher alive, so that an abandoned
    # Prefetcher is collected and its __del__ stops this thread.
    try:
        for item in it:
            if not _put(q, stop, (True, item)):
                return
    except BaseException as exc:  # noqa: BLE001 -- handed to the consumer
        _put(q, stop, (False, exc))
        return
    _put(q, stop, (True, _DONE))


class Prefetcher(Generic[T]):
    """Iterate ``source`` on a daemon thread, ``depth`` items ahead of the consumer.

    An exception raised by ``source`` is re-raised in the consumer at the position it happened. ``close()`` (or
    leaving the ``with`` block, or dropping the object) stops the thread after its current item.
    """

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "transfgu-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(iter(source), self._q, self._stop), name=name, daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        ok, item = self._q.get()
        if not ok:
            self.close()
            raise item
        if item is _DONE:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            stop.set()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PrefetchLoader:
    """A re-iterable wrapper of a ``DataLoader`` whose every epoch is read through a :class:`Prefetcher`.

    With ``num_workers=0`` (``train.num_workers=auto`` on a node of two CPUs or fewer) the batches are otherwise
    read in front of each training step; here the next ``depth`` batches are decoded (and pinned, when the loader
    pins) on a thread while the step runs. ``sampler``, ``batch_sampler`` and ``len`` are those of the wrapped
    loader (``set_epoch`` keeps working).
    """

    def __init__(self, loader: torch.utils.data.DataLoader[Any], depth: int = 2) -> None:
        self.loader = loader
        self.depth = depth

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return Prefetcher(self.loader, depth=self.depth, name="transfgu-batches")


def default_writer_threads(cpus: int | None = None) -> int:
    """Writer threads for this node: one per CPU the process may use, less one for the model's thread, at most 8.

    pyarrow encodes and compresses (zstd) with the GIL released, so the threads write in parallel; 8 covers the
    H200 label bank's ~1 ms/image against ~4-6 ms/image per thread at K = 171 (BENCHMARKS.md §8).
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
    return max(1, min(8, int(cpus) - 1))


class BackgroundWriter:
    """``threads`` writer threads with at most ``max_pending`` queued jobs (back-pressure instead of unbounded
    memory: at most ``max_pending + threads`` results are held, queued or being written).

    ``submit(fn, *args)`` queues ``fn(*args)``. The first job that raises stops the writer (jobs queued after it are
    dropped; jobs already running on other threads finish); its exception is re-raised by the next ``submit`` or by
    ``close()``. ``close()`` (and leaving the ``with`` block, also on an exception) first finishes every job already
    queued, so work that was computed is not lost. With several threads jobs finish out of order: each job must
    write its own file (the sharded stages do: one shard, one atomically renamed file), so the files on disk are the
    same as with one thread.
    """

    def __init__(self, max_pending: int = 2, name: str = "transfgu-writer", threads: int = 1) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.completed = 0
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is _DONE:
                return
            if self._error is not None:
                continue  # after a failure, drop the rest (they are reported by the failure)
            fn, args = job
            try:
                fn(*args)
                with self._lock:
                    self.completed += 1
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the submitting thread
                with self._lock:
                    if self._error is None:  # the first failure is the one reported
                        self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise()
        self._q.put((fn, args))

    def close(self) -> None:
        alive = [t for t in self._threads if t.is_alive()]
        for _ in alive:
            self._q.put(_DONE)  # one stop mark per thread, queued behind every job
        for t in alive:
            t.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The body failed: still write what was already computed, but report the body's error, not ours.
        try:
            self.close()
        except BaseException as werr:  # noqa: BLE001
            log.error("background write failed while handling another error: %s", werr)


def overlapped(
    items: Sequence[T],
    load: Callable[[T], L],
    compute: Callable[[T, L], R],
    write: Callable[[T, R], None] | None = None,
    prefetch: int = 2,
    max_pending_writes: int = 2,
    write_threads: int = 1,
) -> Iterator[tuple[T, R]]:
    """``for it in items: write(it, compute(it, load(it)))`` as a three-stage pipeline; yields ``(item, result)``.

    ``load`` runs on a prefetch thread up to ``prefetch`` items ahead, ``compute`` on the caller's thread (it
    owns the model), ``write`` on ``write_threads`` writer threads (:class:`BackgroundWriter`). Items are computed
    in order; with one writer thread they are also written in order. Every result is
    written before this generator finishes (also when the consumer or ``compute`` raises for a later item).
    """
    if prefetch < 1:
        # Sequential reference path (benchmarks and tests compare against it).
        for it in items:
            res = compute(it, load(it))
            if write is not None:
                write(it, res)
            yield it, res
        return
    loaded = Prefetcher(((it, load(it)) for it in items), depth=prefetch)
    with loaded, BackgroundWriter(max_pending_writes, threads=write_threads) as writer:
        for it, payload in loaded:
            res = compute(it, payload)
            if write is not None:
                writer.submit(write, it, res)
            yield it, res
