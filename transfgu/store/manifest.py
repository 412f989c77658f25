"""The run manifest and the config hash (docs/architecture.md, "Stages").

The run manifest ``<run>/_manifest.json`` records per stage its status, row counts, the hash of its inputs,
outputs, timestamps and free-form extras. It is meant to have a single writer (the driver process); every
update re-reads the file and rewrites it atomically.

A stage's input hash is :func:`config_hash` of its inputs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfgu.schemas import ManifestFile, read_json
from transfgu.store.atomic import PathLike, atomic_write_json, json_default


def config_hash(obj: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``obj`` (sorted keys, no whitespace, UTF-8)."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=json_default
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


STATUSES = ("running", "done", "failed")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``<run>/_manifest.json``: per-stage status, row counts, input hash, outputs, timestamps and extras.

    A stage is skipped on resume when ``is_done(stage, input_hash)``: it finished and was computed from the
    same inputs. Every ``mark_*`` call re-reads the file (so sequential writers from different processes do
    not drop each other's stages) and rewrites it atomically.
    """

    FILE = "_manifest.json"

    def __init__(self, run_dir: PathLike, stages: dict[str, dict[str, Any]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.stages: dict[str, dict[str, Any]] = dict(stages or {})

    @property
    def path(self) -> Path:
        return self.run_dir / self.FILE

    @classmethod
    def load(cls, run_dir: PathLike) -> Manifest:
        """The run's manifest, or an empty one when the file does not exist yet."""
        path = Path(run_dir) / cls.FILE
        if not path.exists():
            return cls(run_dir)
        data = read_json(path, ManifestFile)
        return cls(run_dir, data.get("stages", {}))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "transfgu.manifest/1", "updated_at": _now(), "stages": self.stages}

    def save(self) -> None:
        atomic_write_json(self.path, self.to_dict())

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def _refresh(self) -> None:
        # Merge what other processes wrote meanwhile; the file wins for stages present in both.
        if self.path.exists():
            self.stages = {**self.stages, **Manifest.load(self.run_dir).stages}

    def _update(self, name: str, status: str, **fields: Any) -> dict[str, Any]:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        rec = dict(self.stages.get(name, {}))
        rec["status"] = status
        rec.update(fields)
        self.stages[name] = rec
        self.save()
        return rec

    def mark_running(self, stage: str, input_hash: str | None = None, **info: Any) -> dict[str, Any]:
        self._refresh()
        prev = self.stages.get(stage, {})
        return self._update(
            stage,
            "running",
            input_hash=input_hash,
            started_at=_now(),
            finished_at=None,
            error=None,
            extra={**prev.get("extra", {}), **info},
        )

    def mark_done(
        self,
        stage: str,
        rows: int | Mapping[str, int] | None = None,
        input_hash: str | None = None,
        outputs: Sequence[str] | None = None,
        **info: Any,
    ) -> dict[str, Any]:
        """Record a finished stage; ``rows`` is a count or ``{output: count}``, ``info`` goes to ``extra``."""
        self._refresh()
        prev = self.stages.get(stage, {})
        return self._update(
            stage,
            "done",
            rows=dict(rows) if isinstance(rows, Mapping) else rows,
            input_hash=input_hash if input_hash is not None else prev.get("input_hash"),
            outputs=[str(o) for o in outputs] if outputs is not None else prev.get("outputs", []),
            started_at=prev.get("started_at"),
            finished_at=_now(),
            error=None,
            extra={**prev.get("extra", {}), **info},
        )

    def mark_failed(self, stage: str, error: str, **info: Any) -> dict[str, Any]:
        self._refresh()
        prev = self.stages.get(stage, {})
        return self._update(
            stage, "failed", error=str(error), finished_at=_now(), extra={**prev.get("extra", {}), **info}
        )

    def is_done(self, stage: str, input_hash: str | None = None) -> bool:
        """True when ``stage`` finished and, if ``input_hash`` is given, was computed from those inputs."""
        rec = self.stages.get(stage)
        if rec is None or rec.get("status") != "done":
            return False
        return input_hash is None or rec.get("input_hash") == input_hash

