"""The method registry: the config's ``method`` value -> the :class:`~transfgu.method.Method` that runs it.

Each entry names the module that defines the method's ``METHOD`` value; it is imported on first use (a plug-in
table, as entry points are), so the core modules that ask for a method import none of them. Adding a method is one
module (its stages, its executor-specific pieces, its preflight and report hooks) and one line here
(docs/architecture.md, "How to add a method").
"""

from __future__ import annotations

from functools import cache
from importlib import import_module

from transfgu.config import METHOD_CONFIGS, Config
from transfgu.context import RunContext
from transfgu.method import Method

#: method name -> module that defines ``METHOD``.
REGISTRY: dict[str, str] = {
    "transfgu": "transfgu.methods.transfgu",
    "leopart": "transfgu.methods.leopart",
    "leopart_finetune": "transfgu.methods.leopart_finetune",
}


@cache
def get_method(name: str) -> Method:
    """The registered method ``name``; a ``ValueError`` naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}")
    method = import_module(REGISTRY[name]).METHOD
    if not isinstance(method, Method) or method.name != name:
        raise TypeError(f"{REGISTRY[name]}.METHOD is not the Method {name!r}")
    if METHOD_CONFIGS.get(name) is not method.config:
        raise TypeError(f"{REGISTRY[name]}.METHOD.config is not the configuration class of method {name!r} "
                        "(transfgu.config.METHOD_CONFIGS)")
    return method


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Input hash of every stage of ``cfg.method``: its declared inputs chained with its upstream stage's hash."""
    return get_method(cfg.method).stage_hashes(cfg)


def run_context(cfg: Config) -> RunContext:
    """The run context of ``cfg`` with its method's stage hashes."""
    return RunContext(cfg, stage_hashes(cfg))
