"""``torch.compile`` with a fallback to eager.

* :func:`compile_forward` puts ``torch.compile`` on a :class:`~transfgu.models.backbone.DinoViT`'s eval
  ``forward`` (crop embedding, the foreground prior, the training step's frozen pass) and falls back to the eager
  forward, with one warning, when compilation is unavailable or fails. The pseudo-label pass does not use
  ``forward`` (it calls ``tokens_before_last_block``), so it stays eager and keeps its own precision.
* :func:`compile_function` is the same fallback for any function (the training step's device work,
  :class:`transfgu.engine.step.StepKernels`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from transfgu.models.backbone import ViTFeatures

log = logging.getLogger(__name__)

R = TypeVar("R")


CompileMode = Literal["auto", "on", "off"]


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
    device work (:class:`transfgu.engine.step.StepKernels`). Returns ``fn`` itself when not compiling. The wrapper
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
