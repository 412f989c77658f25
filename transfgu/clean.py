"""``transfgu clean RUN_DIR``: list, then (with ``--yes``) delete the outputs a run has set aside under ``_stale/``
(and, with ``--train-input``, the training-input caches next to the label bank).

Outputs computed from other inputs, torn shards and ``--force``d stages are never deleted by the pipeline: they are
moved to ``<run>/_stale/<stage>/<hash12 | unstamped>/`` (:func:`transfgu.integrity.set_aside`) so that no reader sees
them and nothing a user may still want is lost. ``_stale/`` therefore grows with every re-run under changed settings;
this command is the one way to reclaim the space. It only ever touches ``_stale/`` of a directory that a pipeline run
created (:func:`transfgu.integrity.require_run_dir`), and without ``--yes`` it only prints what it would remove.

``--train-input`` also lists the packed label banks and train-size image stores that training writes once into
``label_bank/_train_input/`` (:mod:`transfgu.data.train_store`): caches, one per key (another train size or image
list gives another), rebuilt by the next training that needs them. Delete them when no training of the run is going.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transfgu.cli_args import HelpFormatter
from transfgu.integrity import STALE_DIR, require_run_dir

DESCRIPTION = """\
List, then (with --yes) delete, the outputs a run has set aside under RUN_DIR/_stale/.

A run never deletes outputs that were computed from other inputs, torn shards or stages re-run with --force: it
moves them to RUN_DIR/_stale/<stage>/<key>/, so that no reader sees them and nothing you may still want is lost.
_stale/ therefore grows with every re-run under changed settings; this command reclaims the space. It only touches
_stale/ of a directory that a pipeline run created, and without --yes it only prints what it would remove.

--train-input also lists the packed label banks and train-size image stores that training writes once into
label_bank/_train_input/: caches, one per key, rebuilt by the next training that needs them. Delete them when no
training of the run is going on."""


@dataclass(frozen=True)
class StaleEntry:
    """One set-aside output: ``_stale/<stage>/<tag>/``, its size on disk and when it was last modified."""

    stage: str
    tag: str
    path: Path
    bytes: int
    mtime: float


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks are not followed: they point outside the run)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def stale_entries(run_dir: Path, stages: Sequence[str] = (), older_than_days: float | None = None) -> list[StaleEntry]:
    """The ``_stale/<stage>/<tag>`` folders of a run, oldest first; filtered by stage and by age when given."""
    root = Path(run_dir) / STALE_DIR
    if not root.is_dir():
        return []
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400.0
    out = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if stages and stage_dir.name not in stages:
            continue
        for tag_dir in sorted(stage_dir.iterdir()):
            mtime = tag_dir.lstat().st_mtime
            if cutoff is not None and mtime > cutoff:
                continue
            out.append(StaleEntry(stage_dir.name, tag_dir.name, tag_dir, _du(tag_dir), mtime))
    return sorted(out, key=lambda e: e.mtime)


def train_input_entries(run_dir: Path) -> list[StaleEntry]:
    """The training-input caches of a run, one entry per store (``bank-<key12>`` or ``images-<key12>``: its data,
    index and stamp files), oldest first. Half-written temporary files of a killed build are listed too."""
    from transfgu.data.train_store import STORE_DIR

    root = Path(run_dir) / "label_bank" / STORE_DIR
    if not root.is_dir() or root.is_symlink():
        return []
    groups: dict[str, list[Path]] = {}
    for f in sorted(root.iterdir()):
        if f.is_file() and not f.is_symlink():
            groups.setdefault(f.name.split(".", 1)[0], []).append(f)
    out = [StaleEntry("train_input", tag, root / tag, sum(f.lstat().st_size for f in files),
                      max(f.lstat().st_mtime for f in files)) for tag, files in groups.items()]
    return sorted(out, key=lambda e: e.mtime)


def remove_train_input(run_dir: Path, entries: Sequence[StaleEntry]) -> int:
    """Delete the files of ``entries`` (from :func:`train_input_entries`); returns the bytes freed."""
    from transfgu.data.train_store import STORE_DIR

    root = (Path(run_dir) / "label_bank" / STORE_DIR).resolve()
    freed = 0
    for e in entries:
        if e.path.parent.resolve() != root:
            raise ValueError(f"refusing to delete {e.path}: not inside {root}")
        for f in root.iterdir():
            if f.is_file() and f.name.split(".", 1)[0] == e.tag:
                freed += f.lstat().st_size
                f.unlink()
    return freed


def remove_entries(run_dir: Path, entries: Sequence[StaleEntry]) -> int:
    """Delete ``entries`` (each must lie inside ``<run>/_stale/``); empty stage folders go too. Returns bytes freed."""
    root = (Path(run_dir) / STALE_DIR).resolve()
    freed = 0
    for e in entries:
        target = e.path.absolute()
        # Refuse anything that is not a direct <stage>/<tag> child of this run's _stale/ (a symlinked stage
        # folder could otherwise point the deletion elsewhere).
        if target.parent.parent.resolve() != root or target.parent.is_symlink():
            raise ValueError(f"refusing to delete {target}: not inside {root}")
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
        freed += e.bytes
    for stage_dir in list(root.iterdir()) if root.is_dir() else []:
        if stage_dir.is_dir() and not stage_dir.is_symlink() and not any(stage_dir.iterdir()):
            stage_dir.rmdir()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return freed


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="transfgu clean", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory (runs/<name>)")
    p.add_argument("--stage", action="append", default=[], help="only this stage's set-aside outputs (repeatable)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="only outputs set aside more than DAYS days ago")
    p.add_argument("--train-input", action="store_true",
                   help="also the training-input caches in label_bank/_train_input/ (rebuilt when needed)")
    p.add_argument("--yes", "-y", action="store_true", help="delete them (default: only list them)")
    args = p.parse_args(argv)
    try:
        run_dir = require_run_dir(args.run_dir, "transfgu clean")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    entries = stale_entries(run_dir, args.stage, args.older_than)
    caches = train_input_entries(run_dir) if args.train_input else []
    entries_all = entries + caches
    total = sum(e.bytes for e in entries_all)
    for e in entries_all:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
        print(f"{e.stage:12} {e.tag:14} {_human(e.bytes):>11}  {when}  {e.path}")
    if not entries_all:
        print(f"nothing set aside under {run_dir / STALE_DIR}" + (" and no training-input cache" if args.train_input
                                                                  else ""))
        return 0
    if not args.yes:
        print(f"{len(entries_all)} set-aside outputs and caches, {_human(total)}; run again with --yes to delete them")
        return 0
    freed = remove_entries(run_dir, entries) + remove_train_input(run_dir, caches)
    print(f"deleted {len(entries_all)} set-aside outputs and caches, {_human(freed)} freed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
