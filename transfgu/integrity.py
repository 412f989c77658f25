"""Integrity of resumable runs: every stage output names the inputs that produced it (docs/reliability.md).

A run directory is resumed by re-running the same command, and re-used when the config changes. Both are only safe
when nothing computed under other settings is mistaken for a current output, and when every image is covered
exactly once whatever happened to the image list between two attempts. The rules, shared by both executors:

* **Stamped outputs.** Each output records the input hash of the stage that wrote it (``stage_hashes``): a
  Parquet shard in its key-value metadata (``transfgu.input_hash``), together with the image ids it covers
  (``transfgu.image_ids``, decode failures included) and the ids that failed to decode (``transfgu.failed_ids``);
  ``concepts.json``, a round's ``state.json``, ``model.json`` and ``metrics.json`` in an ``input_hash`` field.
* **Resume by image id.** :func:`plan_shards` keeps a shard only when its hash is the stage's, its ids are all in
  the current image list and none is covered by a shard kept before it; the images no kept shard covers are
  grouped into new shards. Growing, shrinking or reordering the list between attempts therefore gives every image
  exactly once; :func:`verify_shards` checks that on disk after the stage, and the manifest's counts come from it.
* **Set aside, never reuse, never delete.** An output that does not qualify (another hash, unstamped, torn, or
  covering images no longer listed) is moved to ``<run>/_stale/<stage>/<hash12 | unstamped>/`` (readers skip
  names starting with ``_``); ``--force STAGE`` moves the stage's outputs there before it runs. Nothing is deleted:
  remove ``_stale/`` when the old outputs are no longer wanted.

Nothing here knows about Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from transfgu.layout import RunLayout
from transfgu.paths import PathEscapeError, is_inside, require_inside
from transfgu.store.atomic import atomic_write_json, strict_jsonable
from transfgu.store.formats import list_parquet_files

log = logging.getLogger(__name__)

HASH_KEY = b"transfgu.input_hash"
IDS_KEY = b"transfgu.image_ids"
FAILED_KEY = b"transfgu.failed_ids"
STALE_DIR = "_stale"
UNSTAMPED = "unstamped"
#: ``_stale/_set_aside.jsonl``: one line per output moved aside (stage, tag, name): what ``transfgu clean`` may delete.
STALE_LEDGER = "_set_aside.jsonl"

@dataclass(frozen=True)
class Output:
    """One entry of the run directory that a stage writes, and how resume sorts it.

    ``kind``: ``shards`` -- a directory of stamped Parquet shards (directly or one level down, e.g. per split),
    sorted file by file by :func:`plan_shards` when the stage runs; ``stamped`` -- a directory whose ``stamp`` JSON
    file (written last) records the hash; ``rounds`` -- training rounds, each stamped in its ``state.json``
    (:func:`set_aside_rounds`).
    """

    entry: str
    kind: str = "stamped"
    stamp: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("shards", "stamped", "rounds"):
            raise ValueError(f"unknown output kind {self.kind!r}")
        if self.kind == "stamped" and not self.stamp:
            raise ValueError(f"output {self.entry!r}: a stamped output names its stamp file")


class IntegrityError(RuntimeError):
    """An output does not belong to the current inputs, or does not cover the images exactly once."""


# -- moving outputs aside --------------------------------------------------------------------------------------------
def _tag(input_hash: str | None) -> str:
    return input_hash[:12] if input_hash else UNSTAMPED


def set_aside(path: Path, run_dir: Path, stage: str, input_hash: str | None, why: str) -> Path:
    """Move ``path`` (a file or a directory) to ``<run>/_stale/<stage>/<hash12>/``; never overwrites.

    Returns the new location. The move keeps what a user may still want (an older run's outputs) while
    guaranteeing that no reader of the stage's output directory sees it again.
    """
    tag = _tag(input_hash)
    dest_dir = RunLayout(Path(run_dir)).stale(stage, tag)
    require_inside(dest_dir, run_dir, "the set-aside folder")  # a symlinked _stale/ must not take outputs away
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / path.name
    n = 1
    while dest.exists() or dest.is_symlink():
        dest = dest_dir / f"{path.name}.{n}"
        n += 1
    # Recorded before the move: `transfgu clean` deletes only what this ledger names (a line whose entry never
    # arrived names nothing on disk and is dropped by the next clean).
    record = json.dumps({"stage": stage, "tag": tag, "name": dest.name, "why": why})
    with open(dest_dir.parent.parent / STALE_LEDGER, "a", encoding="utf-8") as fh:
        fh.write(record + "\n")
    shutil.move(str(path), str(dest))
    log.warning("[%s] %s: moved %s aside to %s", stage, why, path, dest)
    return dest


def stale_ledger(run_dir: Path) -> set[tuple[str, str, str]]:
    """``(stage, tag, name)`` of every output :func:`set_aside` moved into ``<run>/_stale/`` (malformed lines are
    ignored: they prove nothing)."""
    path = Path(run_dir) / STALE_DIR / STALE_LEDGER
    if path.is_symlink() or not path.is_file():
        return set()
    out = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            out.add((str(rec["stage"]), str(rec["tag"]), str(rec["name"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def read_json_stamp(path: Path) -> str | None:
    """The ``input_hash`` recorded in a JSON file; None when the file is missing, unreadable or unstamped."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get("input_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def stamp_json(path: Path, input_hash: str) -> None:
    """Add ``input_hash`` to a JSON object file, atomically."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    obj["input_hash"] = input_hash
    atomic_write_json(path, obj)


def check_json_stamp(path: Path, input_hash: str, what: str, fix: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` records ``input_hash`` (an artifact read back before use)."""
    found = read_json_stamp(path)
    if found != input_hash:
        raise IntegrityError(
            f"{what} ({path}) was computed from other inputs (input hash {_tag(found)}, expected "
            f"{_tag(input_hash)}); {fix}"
        )


def prepare_stage_outputs(run_dir: Path, stage: str, input_hash: str, outputs: Sequence[Output],
                          force: bool = False) -> list[Path]:
    """Before a stage runs: set aside whatever of its ``outputs`` another hash produced (all of them with ``force``).

    Sharded outputs are sorted file by file by :func:`plan_shards` when the stage runs, so only ``force`` moves them
    here; training rounds are sorted by :func:`set_aside_rounds`; a stamped output goes when its stamp file records
    another hash or none (an interrupted write). Returns the new locations of what was moved.
    """
    run_dir = Path(run_dir)
    moved: list[Path] = []
    for o in outputs:
        out = run_dir / o.entry
        if not (out.exists() or out.is_symlink()):
            continue
        found = read_json_stamp(out / o.stamp) if o.stamp else None
        if force:
            moved.append(set_aside(out, run_dir, stage, found, "--force"))
        elif o.kind == "stamped" and found != input_hash:
            moved.append(set_aside(out, run_dir, stage, found, "computed from other inputs"))
        elif o.kind == "rounds":
            moved.extend(set_aside_rounds(out, run_dir, input_hash))
    return moved


# -- training rounds -------------------------------------------------------------------------------------------------
def set_aside_rounds(train_dir: Path, run_dir: Path, input_hash: str) -> list[Path]:
    """Move every ``round_*`` whose ``state.json`` records another train hash (or none) out of ``train_dir``.

    A round without ``state.json`` is an unfinished write of this attempt's or an earlier one's; it is left for
    the trainer, which never reads it (``state.json`` marks a complete state) and overwrites it.
    """
    moved = []
    if not Path(train_dir).is_dir():
        return moved
    for rd in sorted(Path(train_dir).glob("round_*")):
        state = rd / "state.json"
        if not state.is_file():
            continue
        found = read_json_stamp(state)
        if found != input_hash:
            moved.append(set_aside(rd, run_dir, "train", found, "training state of other settings"))
    return moved


# -- sharded outputs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardStamp:
    """What a shard file says about itself."""

    input_hash: str | None
    image_ids: tuple[str, ...] | None
    failed_ids: tuple[str, ...]
    rows: int


def stamp_table(table: pa.Table, input_hash: str, image_ids: Sequence[str], failed_ids: Iterable[str] = ()) -> pa.Table:
    """``table`` with the stage hash and the ids it covers (all requested ids, failures included) in its metadata."""
    meta = dict(table.schema.metadata or {})
    meta[HASH_KEY] = input_hash.encode()
    meta[IDS_KEY] = json.dumps(list(image_ids), ensure_ascii=False).encode()
    meta[FAILED_KEY] = json.dumps(sorted(set(failed_ids)), ensure_ascii=False).encode()
    return table.replace_schema_metadata(meta)


def read_stamp(path: Path) -> ShardStamp:
    """The stamp of a shard file; raises ``OSError``/``ValueError`` when the file is torn or not Parquet."""
    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    ids = json.loads(meta[IDS_KEY]) if IDS_KEY in meta else None
    failed = json.loads(meta[FAILED_KEY]) if FAILED_KEY in meta else []
    h = meta[HASH_KEY].decode() if HASH_KEY in meta else None
    return ShardStamp(h, tuple(ids) if ids is not None else None, tuple(failed), pf.metadata.num_rows)


@dataclass
class ShardGroup:
    """Images (positions in the current image list) to compute into one new shard file."""

    name: str
    positions: list[int]


@dataclass
class ShardPlan:
    """Which shard files are kept and which images still need computing, by image id."""

    kept: dict[Path, ShardStamp] = field(default_factory=dict)
    groups: list[ShardGroup] = field(default_factory=list)

    @property
    def covered(self) -> set[str]:
        return {i for s in self.kept.values() for i in (s.image_ids or ())}

    @property
    def todo(self) -> list[int]:
        return sorted(p for g in self.groups for p in g.positions)


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(ids), ensure_ascii=False).encode()).hexdigest()[:8]


def plan_shards(
    out_dir: Path, run_dir: Path, stage: str, input_hash: str, image_ids: Sequence[str], shard_images: int
) -> ShardPlan:
    """Sort ``out_dir``'s shard files into kept and set aside, and group the images still to compute.

    A file is kept when it is readable, carries ``input_hash``, covers only ids of ``image_ids`` and none that a
    file kept before it (file-name order) covers; everything else is moved aside (:func:`set_aside`). The images
    left are grouped by their position: positions ``[s * shard_images, (s + 1) * shard_images)`` form shard ``s``,
    written as ``part-<s>.parquet`` when the whole shard is computed (the name a fresh run uses) and as
    ``part-<s>-<first position>.parquet`` for a piece; a name already taken by a kept file gets the digest of
    its ids appended. Every name is a function of the images and the kept files only, so a retried batch replaces
    its own file.
    """
    if len(set(image_ids)) != len(image_ids):
        dup = sorted({i for i in image_ids if list(image_ids).count(i) > 1})[:5]
        raise IntegrityError(f"{stage}: duplicate image ids in the image list, e.g. {dup}")
    out_dir = Path(out_dir)
    wanted = set(image_ids)
    plan = ShardPlan()
    covered: set[str] = set()
    if out_dir.is_dir():
        for path in list_parquet_files(out_dir):
            try:
                st = read_stamp(path)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: a torn or foreign file
                set_aside(path, run_dir, stage, None, f"unreadable shard ({exc})")
                continue
            if st.input_hash != input_hash or st.image_ids is None:
                set_aside(path, run_dir, stage, st.input_hash, "shard computed from other inputs")
                continue
            ids = set(st.image_ids)
            if not ids <= wanted:
                set_aside(path, run_dir, stage, st.input_hash,
                          f"shard covers {len(ids - wanted)} image(s) no longer in the image list")
                continue
            if ids & covered:
                set_aside(path, run_dir, stage, st.input_hash,
                          f"shard repeats {len(ids & covered)} image(s) another kept shard covers")
                continue
            covered |= ids
            plan.kept[path] = st
    taken = {p.name for p in plan.kept}
    by_shard: dict[int, list[int]] = {}
    for pos, image_id in enumerate(image_ids):
        if image_id not in covered:
            by_shard.setdefault(pos // shard_images, []).append(pos)
    for s, positions in sorted(by_shard.items()):
        whole = positions == list(range(s * shard_images, min((s + 1) * shard_images, len(image_ids))))
        name = f"part-{s:05d}.parquet" if whole else f"part-{s:05d}-{positions[0]:07d}.parquet"
        if name in taken:
            name = name.replace(".parquet", f"-{_ids_digest([image_ids[p] for p in positions])}.parquet")
        taken.add(name)
        plan.groups.append(ShardGroup(name, positions))
    if plan.kept:
        log.info("[%s] %d of %d images already covered by %d kept shard(s)", stage, len(covered), len(image_ids),
                 len(plan.kept))
    return plan


@dataclass(frozen=True)
class ShardSummary:
    """What a sharded stage's directory holds, read from disk (the manifest's counts)."""

    rows: int
    images: int  # ids covered that decoded
    failed: int  # ids covered that failed to decode
    files: int


def verify_shards(out_dir: Path, stage: str, input_hash: str, image_ids: Sequence[str]) -> ShardSummary:
    """Check that ``out_dir`` covers exactly ``image_ids``, each once, all under ``input_hash``; count from disk."""
    seen: dict[str, Path] = {}
    rows = failed = files = 0
    for path in list_parquet_files(out_dir) if Path(out_dir).is_dir() else []:
        st = read_stamp(path)
        if st.input_hash != input_hash or st.image_ids is None:
            raise IntegrityError(
                f"{stage}: {path} was computed from other inputs (input hash {_tag(st.input_hash)}, expected "
                f"{_tag(input_hash)}); re-run the stage with --force {stage}"
            )
        for i in st.image_ids:
            if i in seen:
                raise IntegrityError(f"{stage}: image {i!r} is covered twice ({seen[i].name} and {path.name})")
            seen[i] = path
        rows += st.rows
        failed += len(st.failed_ids)
        files += 1
    missing = [i for i in image_ids if i not in seen]
    extra = sorted(set(seen) - set(image_ids))
    if missing or extra:
        raise IntegrityError(
            f"{stage}: {out_dir} covers {len(seen)} images: {len(missing)} listed image(s) missing (e.g. "
            f"{missing[:3]}), {len(extra)} not listed (e.g. {extra[:3]}); re-run the stage with --force {stage}"
        )
    return ShardSummary(rows=rows, images=len(seen) - failed, failed=failed, files=files)


def require_stamped(out_dir: Path, stage: str, input_hash: str) -> None:
    """A downstream stage's check before it reads ``out_dir``: every shard carries ``input_hash``."""
    files = list_parquet_files(out_dir)
    if not files:
        raise IntegrityError(f"{stage}: no shard files under {out_dir}; run the {stage} stage first")
    for path in files:
        try:
            h = read_stamp(path).input_hash
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{stage}: {path} is unreadable ({exc}); re-run with --force {stage}") from exc
        if h != input_hash:
            raise IntegrityError(
                f"{stage}: {path} was computed from other inputs (input hash {_tag(h)}, expected {_tag(input_hash)})"
                f"; re-run with --force {stage}"
            )


# -- strict JSON -----------------------------------------------------------------------------------------------------
def write_json_strict(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    """Write ``obj`` as strict JSON (no bare NaN/Infinity): non-finite numbers become ``null`` and a
    ``"null_reasons": {json path: reason}`` entry says why. Returns what was written."""
    reasons: dict[str, str] = {}
    clean = strict_jsonable(obj, "", reasons)
    if reasons:
        clean = {**clean, "null_reasons": {**clean.get("null_reasons", {}), **reasons}}
    atomic_write_json(path, clean)
    return clean


# -- commands that write into a directory the user names -------------------------------------------------------------
RUN_MARKERS = ("_manifest.json", "config.yaml", "pipeline.log")
REPORT_MARKER = "_report.json"


def is_run_dir(path: Path) -> bool:
    """True for a directory a pipeline run created (it holds one of :data:`RUN_MARKERS`) or that
    ``transfgu report`` already wrote into (``report/_report.json``)."""
    p = Path(path)
    return p.is_dir() and (any((p / m).is_file() for m in RUN_MARKERS)
                           or (RunLayout(p).report / REPORT_MARKER).is_file())


def report_files(report_dir: Path) -> list[str]:
    """Names of the files an earlier ``write_report`` created in ``report_dir`` (the only ones it may remove)."""
    try:
        names = json.loads((Path(report_dir) / REPORT_MARKER).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    # names only: a crafted marker must not point outside report/
    return [n for n in names if isinstance(n, str) and "/" not in n and "\\" not in n and n not in ("", ".", "..")]


def require_run_dir(path: Path, command: str) -> Path:
    """``path`` when it is a run directory, else a ``ValueError`` (``command`` would write into a foreign folder)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {p}")
    if not is_run_dir(p):
        raise ValueError(
            f"{p} is not a transfgu run directory (no {' or '.join(RUN_MARKERS)}); {command} writes only into "
            "run directories, to never touch files it did not create"
        )
    return p


PREDICT_MARKER = "predict.json"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_predict_output(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse a ``predict --out`` that could overwrite or re-read user files.

    ``out`` may not be an input folder or lie inside one (the label maps would replace the images, and a later
    run would read them as inputs), may not contain an input, and, when it already holds files, must be an
    earlier prediction output (it holds ``predict.json``).
    """
    o = Path(out).resolve()
    for item in inputs:
        i = Path(item).resolve()
        folder = i if i.is_dir() else i.parent
        if i.is_dir() and _inside(o, folder):
            raise ValueError(f"--out {out} is the input folder {item} or inside it: the label maps could replace "
                             "the images and be read as inputs by a later run; choose a folder outside the inputs")
        if _inside(i, o):
            raise ValueError(f"--out {out} contains the input {item}; choose a folder outside the inputs")
        if i.is_file() and not i.is_dir() and folder == o:
            raise ValueError(f"--out {out} is the folder of the input {item}; choose a folder outside the inputs")
    if o.is_dir() and any(o.iterdir()) and not (o / PREDICT_MARKER).is_file():
        raise ValueError(f"--out {out} already holds files that `transfgu predict` did not write (no "
                         f"{PREDICT_MARKER}); choose an empty or new folder")
    # predict writes <out>/<stem>.png, predict.json, errors.jsonl and overlay/<stem>.jpg: none may lead out of it
    for folder in (o, o / "overlay"):
        for p in (folder, *folder.iterdir()) if folder.is_dir() or folder.is_symlink() else ():
            if p.is_symlink() and not is_inside(p, o):
                raise PathEscapeError(f"--out {out}: {p} is a symbolic link out of the output folder; predict "
                                      "writes only inside it")
