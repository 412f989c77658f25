"""Keeping the accelerator busy: compiled backbone forward, pinned async copies, prefetch and background writes.

None of this changes what a stage computes; it changes *when* the host does its part. A stage that decodes,
computes and writes one shard after the other costs ``sum(decode) + sum(model) + sum(write)``; with the next
shard decoded on a background thread (:class:`Prefetcher`) and the previous one written on another
(:class:`BackgroundWriter`), it costs about ``max(decode, model, write)`` per shard (:func:`overlapped`). That is
the property ``tests/test_throughput.py`` checks on CPU with a fixed-latency stand-in for the model.

* :func:`compile_forward` puts ``torch.compile`` on a :class:`~transfgu.models.backbone.DinoViT`'s eval
  ``forward`` (crop embedding, the foreground prior, the training step's frozen pass) and falls back to the eager
  forward, with one warning, when compilation is unavailable or fails. The pseudo-label pass does not use
  ``forward`` (it calls ``tokens_before_last_block``), so it stays eager and keeps its own precision.
* :func:`to_device` pins a host tensor and copies it with ``non_blocking=True``: the copy overlaps with kernels
  already queued instead of synchronising the stream (a plain ``.to("cuda")`` of pageable memory waits).
* :func:`prepare_images` resizes + normalises a group of decoded images into one (pinned) batch, so that work can
  run in the prefetch thread instead of in front of the model.

* :func:`compile_function` is the same fallback for any function (the training step's device work,
  :class:`transfgu.engine.StepKernels`); :class:`HostSyncCounter` counts host reads of device values on any device
  (the CPU test that a training step reads nothing back).

Nothing here knows about Ray; the Ray stage actors run the same stage code (``context.run_backbone``,
``ShardedStage.load``/``compute``) with two calls per actor in place of the prefetch and writer threads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from transfgu.data.transforms import to_model_input

log = logging.getLogger(__name__)

T = TypeVar("T")
L = TypeVar("L")
R = TypeVar("R")

CompileMode = Literal["auto", "on", "off"]

__all__ = [
    "BackgroundWriter",
    "PrefetchLoader",
    "Prefetcher",
    "HostSyncCounter",
    "compile_backend_from_env",
    "compile_forward",
    "compile_function",
    "compile_mode_from_env",
    "default_writer_threads",
    "overlapped",
    "prepare_images",
    "to_device",
]


# ----------------------------------------------------------------------------------------------------------
# Host -> device
# ----------------------------------------------------------------------------------------------------------
def pin(x: Tensor) -> Tensor:
    """Page-locked copy of a CPU tensor when CUDA is present (else ``x``): needed for truly async copies."""
    if x.device.type == "cpu" and torch.cuda.is_available() and not x.is_pinned():
        return x.pin_memory()
    return x


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x.to(device)`` that does not stall the CUDA stream: pinned source, ``non_blocking=True``.

    Safe for pageable sources too (CUDA stages them before the call returns); on CPU it is a no-op.
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda":
        return pin(x).to(device, non_blocking=True)
    return x.to(device)


def prepare_images(images: Sequence[np.ndarray], size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Decoded uint8 ``(H, W, 3)`` images -> one ImageNet-normalised ``(B, 3, h, w)`` float batch (pinned on CUDA
    machines), exactly :func:`transfgu.data.transforms.to_model_input` per image; runs in the prefetch thread."""
    if len(images) == 0:
        return torch.empty(0, 3, int(size[0]), int(size[1]))
    return pin(torch.stack([to_model_input(im, (int(size[0]), int(size[1])), mode) for im in images]))


# ----------------------------------------------------------------------------------------------------------
# torch.compile with a fallback
# ----------------------------------------------------------------------------------------------------------
def compile_mode_from_env() -> CompileMode:
    """``TRANSFGU_COMPILE`` = ``auto`` (default: compile on CUDA only), ``on``/``1`` or ``off``/``0``."""
    v = os.environ.get("TRANSFGU_COMPILE", "auto").strip().lower()
    if v in ("1", "on", "true", "yes"):
        return "on"
    if v in ("0", "off", "false", "no"):
        return "off"
    return "auto"


def compile_backend_from_env() -> str:
    """``TRANSFGU_COMPILE_BACKEND`` (default ``inductor``; ``aot_eager``/``eager`` trace without generating code,
    which tests use to run the compiled paths on a CPU, also inside Ray workers)."""
    return os.environ.get("TRANSFGU_COMPILE_BACKEND", "").strip() or "inductor"


def compile_forward(
    backbone: torch.nn.Module,
    mode: CompileMode | None = None,
    backend: str | Callable[..., Any] | None = None,
    compile_kwargs: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Route ``backbone.forward`` (a DinoViT's eval forward) through ``torch.compile``; returns ``backbone``.

    ``mode``: ``"auto"`` compiles when the backbone's parameters are on CUDA (on a CPU the compile time is not
    paid back by the short runs it does here), ``"on"`` always, ``"off"`` never; default from
    :func:`compile_mode_from_env`. The compiled function returns plain tensors (no dataclass in the graph);
    the :class:`~transfgu.models.backbone.ViTFeatures` is rebuilt around them. If compiling or running the
    compiled function raises (no C++ compiler, an unsupported op, an old torch), the eager forward is used from
    then on and one warning says why: outputs never depend on whether compilation worked.
    """
    from transfgu.models.backbone import ViTFeatures

    mode = mode or compile_mode_from_env()
    backend = backend or compile_backend_from_env()
    if mode == "off" or getattr(backbone, "_transfgu_compiled", False):
        return backbone
    try:
        on_cuda = next(backbone.parameters()).is_cuda
    except StopIteration:
        on_cuda = False
    if mode == "auto" and not on_cuda:
        return backbone
    if not hasattr(torch, "compile"):
        log.warning("torch.compile is not available in torch %s; using the eager backbone", torch.__version__)
        return backbone
    eager = backbone.forward

    def plain(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = eager(x)
        return f.cls, f.patch, f.attn_cls

    # dynamic=False: one specialised graph per input shape (crops, prior pass, training crops); embed_crops pads
    # the last chunk of a compiled backbone to the full batch so that ragged tails do not add shapes.
    compiled = torch.compile(plain, backend=backend, **{"dynamic": False, **(compile_kwargs or {})})
    state = {"failed": False}

    def forward(x: Tensor) -> ViTFeatures:
        if not state["failed"]:
            try:
                cls, patch, attn = compiled(x)
                return ViTFeatures(cls=cls, patch=patch, attn_cls=attn, grid=backbone._grid(x))
            except Exception as exc:  # noqa: BLE001 -- any compile/runtime failure means: use eager
                state["failed"] = True
                log.warning("torch.compile of the backbone forward failed (%s: %s); using eager", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        return eager(x)

    backbone.forward = forward  # type: ignore[method-assign]  # instance attribute: nn.Module.__call__ uses it
    backbone._transfgu_compiled = True  # type: ignore[attr-defined]
    backbone._transfgu_compile_state = state  # type: ignore[attr-defined]
    backbone._transfgu_eager_forward = eager  # type: ignore[attr-defined]  # for benchmarks: the same, uncompiled
    return backbone


def compile_function(
    fn: Callable[..., R],
    mode: CompileMode | None = None,
    on_cuda: bool = False,
    backend: str | Callable[..., Any] | None = None,
    name: str | None = None,
) -> Callable[..., R]:
    """``torch.compile(fn)`` with the fallback of :func:`compile_forward`: any failure -> eager, one warning.

    ``mode`` as in :func:`compile_forward` (``"auto"`` compiles when ``on_cuda``). Used for the training step's
    device work (:class:`transfgu.engine.StepKernels`). Returns ``fn`` itself when not compiling. The wrapper
    exposes ``compiled`` (True while the compiled function is in use) and ``eager`` (``fn``).
    """
    mode = mode or compile_mode_from_env()
    backend = backend or compile_backend_from_env()
    label = name or getattr(fn, "__name__", "function")
    if mode == "off" or (mode == "auto" and not on_cuda):
        return fn
    if not hasattr(torch, "compile"):
        log.warning("torch.compile is not available in torch %s; %s runs eagerly", torch.__version__, label)
        return fn
    compiled = torch.compile(fn, backend=backend, dynamic=False)

    def run(*args: Any, **kwargs: Any) -> R:
        if run.compiled:  # type: ignore[attr-defined]
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- any compile/runtime failure means: use eager
                run.compiled = False  # type: ignore[attr-defined]
                log.warning("torch.compile of %s failed (%s: %s); using eager", label, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        return fn(*args, **kwargs)

    run.compiled = True  # type: ignore[attr-defined]
    run.eager = fn  # type: ignore[attr-defined]
    return run


# ----------------------------------------------------------------------------------------------------------
# Prefetch and background writes
# ----------------------------------------------------------------------------------------------------------
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


def count_cuda_syncs(fn: Callable[[], object]) -> int:
    """Host-device synchronisations during ``fn()``, counted by ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class HostSyncCounter:
    """Count the host reads of *device* tensors during a block, on any device (the CPU counterpart of
    :func:`count_cuda_syncs`).

    On a CUDA machine every host read of a device value (``.item()``, ``float()``, ``bool()`` of a comparison,
    ``.tolist()``, ``.cpu()``, ``nonzero``, boolean indexing) waits for the GPU. On a CPU there is no device, so
    this counter follows the values instead: tensors passed to :meth:`mark` (the batch, the parameters) are
    device tensors, and so is every output (and every tensor written in place) of an op that reads one. A read
    of such a tensor is counted (``events`` holds what and where); host-made tensors (the CPU generator's draws)
    are not. A ``TorchDispatchMode`` sees every op of the calling thread (also those called from C++, e.g.
    ``float(t)``); ``tolist``/``numpy``/``cpu`` are watched at the Python level as well.
    """

    _ATTR = "_transfgu_on_device"
    _SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                 "unique_consecutive", "repeat_interleave")  # fmt: skip

    def __init__(self) -> None:
        self.events: list[str] = []

    @classmethod
    def mark(cls, *tensors: Tensor) -> None:
        for t in tensors:
            setattr(t, cls._ATTR, True)

    @classmethod
    def on_device(cls, t: object) -> bool:
        return isinstance(t, Tensor) and bool(getattr(t, cls._ATTR, False))

    @property
    def count(self) -> int:
        return len(self.events)

    def _record(self, what: str) -> None:
        import traceback

        stack = traceback.extract_stack()[:-2]
        frames = [f for f in stack if "transfgu" in f.filename and "throughput" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.events.append(f"{what} at {where}")

    def __enter__(self) -> HostSyncCounter:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
                kwargs = kwargs or {}
                flat = tree_flatten((args, kwargs))[0]
                dev = any(counter.on_device(t) for t in flat)
                if dev and func.__name__.split(".")[0] in counter._SYNC_OPS:
                    counter._record(func.__name__)
                out = func(*args, **kwargs)
                if dev:
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, Tensor):
                            setattr(t, counter._ATTR, True)
                    for a, arg in zip(func._schema.arguments, args):
                        if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, Tensor):
                            setattr(arg, counter._ATTR, True)
                return out

        self._patched = {}
        for meth in ("tolist", "numpy", "cpu"):
            orig = getattr(Tensor, meth)
            self._patched[meth] = orig

            def watched(t: Tensor, *a: Any, _orig: Callable[..., Any] = orig, _m: str = meth, **k: Any) -> Any:
                if counter.on_device(t):
                    counter._record(_m)
                return _orig(t, *a, **k)

            setattr(Tensor, meth, watched)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for meth, orig in self._patched.items():
            setattr(Tensor, meth, orig)
