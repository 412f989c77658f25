"""What a method is to the core: its stages, how they chain their input hashes, and the one stage/executor contract.

A method (TransFGU, Leopart, Leopart's dense fine-tuning) is a :class:`Method` value registered in
:mod:`transfgu.methods`; the orchestration (:mod:`transfgu.pipeline`), the run context, the integrity rules, MLflow
tracking, the report and preflight read everything method-specific from it and import no method.

Every stage is a function ``run(ctx, ex) -> StageInfo``: ``ctx`` is the run's :class:`~transfgu.context.RunContext`,
``ex`` the :class:`Executor` that schedules the stage's work (one process: :class:`transfgu.local.LocalExecutor`;
a Ray cluster: :class:`transfgu.distributed.executor.RayExecutor`). A stage whose work the protocol cannot express
yet gives an executor-specific function in :attr:`Stage.on` (TransFGU's Ray k-means and Ray Train rounds).

Input hashes are chained generically (:meth:`Method.stage_hashes`): a stage's hash is the hash of its declared inputs
(:attr:`Stage.inputs`, a function of the config as plain data) and its upstream stage's hash.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.integrity import Output
from transfgu.sharded import ShardedStage
from transfgu.store.manifest import config_hash

#: What a stage returns: its manifest info (counts, scores, seconds are added by the pipeline).
StageInfo = dict[str, Any]
T = TypeVar("T")
H = TypeVar("H")


class Executor(Protocol):
    """How a stage's work is scheduled. One implementation per executor; the stages are written against this.

    * :meth:`run_sharded`: a per-image stage (:class:`transfgu.sharded.ShardedStage`) over its records, resumed by
      image id and stamped (:mod:`transfgu.integrity`); returns the stage's ``finish`` info.
    * :meth:`map_files`: ``fn(path)`` for every file, results in file order.
    * :meth:`hold`: objects ``holder(files_of_a_group, *args)`` that keep a group of files in memory and answer
      per-file questions, seen as one object whose methods return per-file lists in file order (one process: a
      single holder; Ray: one actor per group). :meth:`release` frees them.
    """

    name: str

    def run_sharded(self, ctx: RunContext, stage: type[ShardedStage]) -> StageInfo: ...

    def map_files(self, fn: Callable[[str], T], files: Sequence[Path]) -> list[T]: ...

    def hold(self, holder: Callable[..., H], files: Sequence[Path], *args: Any) -> H: ...

    def release(self, held: object) -> None: ...


#: A stage as the pipeline runs it.
StageFn = Callable[[RunContext, Executor], StageInfo]
#: A stage's declared hash inputs: the config as plain data (``Config.model_dump`` in JSON mode) -> what it hashes.
HashInputs = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of a method: its name, its outputs in the run directory, its hash inputs and how it runs."""

    name: str
    run: StageFn
    inputs: HashInputs
    outputs: tuple[Output, ...] = ()
    #: Executor name -> the stage for that executor, where it is not ``run`` (work the protocol cannot express).
    on: Mapping[str, StageFn] = field(default_factory=dict)
    #: The stage reports per-epoch metrics (an MLflow epoch logger is opened around it).
    epochs: bool = False

    def runner(self, executor: str) -> StageFn:
        return self.on.get(executor, self.run)


@dataclass(frozen=True)
class Method:
    """A method as a plug-in: ``name`` is the config's ``method`` value."""

    name: str
    stages: tuple[Stage, ...]
    #: The method's configuration class (:data:`transfgu.config.METHOD_CONFIGS`): the shared sections and its own.
    #: What "the paper's protocol" means for the method is its :attr:`~transfgu.config.Config.follows_paper`.
    config: type[Config] = Config
    #: The method's name as its paper writes it (the report's title); ``name`` when empty.
    title: str = ""
    #: Preflight: ``(key, message)`` problems of the sizes the method reads, given the backbone's patch size.
    check_sizes: Callable[[Config, int], list[tuple[str, str]]] = lambda cfg, patch: []
    #: Preflight: ``(size key, batch key, pass size, batch, full-resolution output maps)`` of every backbone pass the
    #: method makes, for the memory estimate of :func:`transfgu.preflight.check_memory`.
    memory_passes: Callable[[Config], list[tuple[str, str, tuple[int, int], int, int]]] = lambda cfg: []
    #: Preflight, once the data is readable: what the method asks of ``n_train`` training images.
    check_fit: Callable[[Config, int, int], list[tuple[str, str]]] = lambda cfg, n_train, patch: []
    #: One line for the report's summary (HTML, escaped by the method).
    summary: Callable[[Config], str] = lambda cfg: ""
    #: The report's sections: ``fn(builders, run_dir, out, cfg, metrics, options)`` -> the ``(title, builder)``
    #: list to draw, from the generic one (:func:`transfgu.report.write_report`).
    report_sections: Callable[..., list[tuple[str, Callable[[], Any]]]] = lambda builders, *_: builders
    #: The MLflow pyfunc wraps this method's ``model/`` (TransFGU's decoder).
    mlflow_model: bool = False

    @property
    def display_name(self) -> str:
        return self.title or self.name

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"method {self.name!r} has no stage {name!r} (its stages: {', '.join(self.stage_names)})")

    def stage_hashes(self, cfg: Config) -> dict[str, str]:
        """Input hash of every stage: its declared inputs chained with its upstream stage's hash."""
        d = json.loads(cfg.model_dump_json())
        out: dict[str, str] = {}
        up: str | None = None
        for s in self.stages:
            up = config_hash({**({"up": up} if up is not None else {}), **s.inputs(d)})
            out[s.name] = up
        return out
