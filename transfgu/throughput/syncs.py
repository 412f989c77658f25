"""Counting host-device synchronisations: :func:`count_cuda_syncs` (CUDA) and :class:`HostSyncCounter` (host reads
of device values on any device; the CPU test that a training step reads nothing back)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


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
