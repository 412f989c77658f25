"""``transfgu clean RUN_DIR``: list, then (with ``--yes``) delete the outputs a run has set aside under ``_stale/``
(and, with ``--train-input``, the training-input caches next to the label bank).

Outputs computed from other inputs, torn shards and ``--force``d stages are never deleted by the pipeline: they are
moved to ``<run>/_stale/<stage>/<hash12 | unstamped>/`` (:func:`transfgu.integrity.set_aside`) so that no reader sees
them and nothing a user may still want is lost. ``_stale/`` therefore grows with every re-run under changed settings;
this command is the one way to reclaim the space. It only ever touches ``_stale/`` of a directory that a pipeline run
created (:func:`transfgu.integrity.require_run_dir`), and without ``--yes`` it only prints what it would remove.
It deletes only what it can prove the pipeline moved there: the entries recorded in ``_stale/_set_aside.jsonl``
(written by ``set_aside`` before each move); anything else found under ``_stale/`` is named and left alone, and a
symbolic link is never followed (a linked ``_stale/`` or stage folder is refused, a linked entry is removed as a link).

``--train-input`` also lists the packed label banks and train-size image stores that training writes once into
``label_bank/_train_input/`` (:mod:`transfgu.data.train_store`): caches, one per key (another train size or image
list gives another), rebuilt by the next training that needs them. Delete them when no training of the run is going.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transfgu.cli_args import HelpFormatter
from transfgu.integrity import STALE_DIR, STALE_LEDGER, require_run_dir, stale_ledger
from transfgu.layout import RunLayout
from transfgu.paths import PathEscapeError, check_name, is_inside, require_inside
from transfgu.store.atomic import atomic_write_text

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
    """One set-aside output: ``_stale/<stage>/<tag>/``, its size on disk and when it was last modified.

    ``names``: the entries of the folder that ``_stale/_set_aside.jsonl`` proves the pipeline moved there (the only
    ones ``--yes`` deletes; ``bytes`` counts those); ``foreign``: anything else found there (left alone).
    """

    stage: str
    tag: str
    path: Path
    bytes: int
    mtime: float
    names: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks are not followed: they point outside the run)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _stale_root(run_dir: Path) -> Path:
    """``<run>/_stale``, refused when it is a symbolic link (the pipeline creates a real folder; a link would send
    the deletion elsewhere)."""
    root = Path(run_dir) / STALE_DIR
    if root.is_symlink():
        raise PathEscapeError(f"refusing to touch {root}: it is a symbolic link (to {root.resolve()}), not the "
                              "folder the pipeline created")
    return root


def stale_entries(run_dir: Path, stages: Sequence[str] = (), older_than_days: float | None = None) -> list[StaleEntry]:
    """The ``_stale/<stage>/<tag>`` folders of a run, oldest first; filtered by stage and by age when given.

    Symbolic links among them are skipped; each entry says which of its contents the pipeline's ledger proves it
    set aside (``names``) and which not (``foreign``).
    """
    root = _stale_root(run_dir)
    if not root.is_dir():
        return []
    ledger = stale_ledger(run_dir)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400.0
    out = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if stages and stage_dir.name not in stages:
            continue
        for tag_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            mtime = tag_dir.lstat().st_mtime
            if cutoff is not None and mtime > cutoff:
                continue
            children = sorted(c.name for c in tag_dir.iterdir())
            names = tuple(n for n in children if (stage_dir.name, tag_dir.name, n) in ledger)
            foreign = tuple(n for n in children if n not in names)
            size = sum(_du(tag_dir / n) for n in names)
            out.append(StaleEntry(stage_dir.name, tag_dir.name, tag_dir, size, mtime, names, foreign))
    return sorted(out, key=lambda e: e.mtime)


def train_input_entries(run_dir: Path) -> list[StaleEntry]:
    """The training-input caches of a run, one entry per store (``bank-<key12>`` or ``images-<key12>``: its data,
    index and stamp files), oldest first. Half-written temporary files of a killed build are listed too."""
    root = RunLayout(run_dir).train_input
    if not root.is_dir() or root.is_symlink() or not is_inside(root, run_dir):  # a linked label_bank/ too
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
    root = require_inside(RunLayout(run_dir).train_input, run_dir, "the training-input caches").resolve()
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
    """Delete the proven contents (``names``) of ``entries``, each a real ``<stage>/<tag>`` folder of this run's
    ``_stale/``; a folder left empty goes too, and so do empty stage folders. Returns the bytes freed.

    Nothing is followed out of the run: a symbolic link is removed as a link, never through it, and
    ``shutil.rmtree`` does not descend into links.
    """
    root_link = _stale_root(run_dir)
    root = root_link.resolve()
    require_inside(root, run_dir, "the set-aside folder")
    ledger = stale_ledger(run_dir)
    freed = 0
    for e in entries:
        target = e.path.absolute()
        # Refuse anything that is not a direct <stage>/<tag> child of this run's _stale/ (a symlinked stage
        # folder could otherwise point the deletion elsewhere).
        if target.parent.parent.resolve() != root or target.parent.is_symlink() or target.is_symlink():
            raise ValueError(f"refusing to delete {target}: not inside {root}")
        for name in e.names:
            check_name(name, "a set-aside entry")
            if (e.stage, e.tag, name) not in ledger:
                raise ValueError(f"refusing to delete {target / name}: the pipeline did not set it aside")
            child = target / name
            size = _du(child) if child.exists() or child.is_symlink() else 0
            if child.is_symlink() or child.is_file():
                child.unlink()
            elif child.is_dir():
                shutil.rmtree(child)
            freed += size
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    for stage_dir in list(root_link.iterdir()) if root_link.is_dir() else []:
        if stage_dir.is_dir() and not stage_dir.is_symlink() and not any(stage_dir.iterdir()):
            stage_dir.rmdir()
    _prune_ledger(run_dir)
    return freed


def _prune_ledger(run_dir: Path) -> None:
    """Drop ledger lines whose entry is gone; remove ``_stale/`` when nothing but an empty ledger is left."""
    root = _stale_root(run_dir)
    ledger_path = root / STALE_LEDGER
    if not root.is_dir():
        return
    keep = []
    if ledger_path.is_file() and not ledger_path.is_symlink():
        for line in ledger_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                entry = root / str(rec["stage"]) / str(rec["tag"]) / str(rec["name"])
            except (ValueError, KeyError, TypeError):
                continue
            if entry.exists() or entry.is_symlink():
                keep.append(line)
        if keep:
            atomic_write_text(ledger_path, "\n".join(keep) + "\n")
        else:
            ledger_path.unlink()
    if not any(root.iterdir()):
        root.rmdir()


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
        entries = stale_entries(run_dir, args.stage, args.older_than)
        caches = train_input_entries(run_dir) if args.train_input else []
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for e in entries:
        if e.foreign:
            print(f"warning: {e.path} holds {', '.join(e.foreign)}, which the pipeline did not set aside (not in "
                  f"{STALE_DIR}/{STALE_LEDGER}): left alone; delete it by hand if it is yours", file=sys.stderr)
    entries = [e for e in entries if e.names]
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
