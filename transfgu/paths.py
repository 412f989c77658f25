"""Where the program may write or delete: every such path is resolved and must lie inside its root.

The roots are the run root (``run.root``: a run directory is ``<run.root>/<run.name>`` and ``run.name`` is one
path component), a run directory (its outputs, ``_stale/``, ``report/``, ``ray_results/``) and a command's
output folder (``predict --out``). A symbolic link inside a root that points out of it is never written or deleted
through: the path resolves outside its root and the command is refused (docs/reliability.md, "Trust boundaries").
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PathEscapeError", "check_name", "default_storage", "is_inside", "require_inside"]


class PathEscapeError(ValueError):
    """A path the program would write or delete resolves outside the root it must stay in."""


def check_name(value: str, key: str) -> str:
    """``value`` when it is one plain path component (a name such as ``demo``), else a ``ValueError`` naming ``key``.

    Refused: empty, ``.``, ``..``, an absolute path, any ``/`` or ``\\``, a NUL byte, a leading ``~``.
    """
    if not isinstance(value, str) or value.strip() in ("", ".", ".."):
        raise ValueError(f"{key} must be a name (one folder name such as 'demo')")
    if "/" in value or "\\" in value or "\x00" in value or value.startswith("~") or os.path.isabs(value):
        raise ValueError(f"{key} must be a name, not a path: the folder is always created directly under its "
                         "root; change the root instead")
    return value


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` resolves (symbolic links followed) to ``root`` resolved or to something under it."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def require_inside(path: Path, root: Path, what: str) -> Path:
    """``path`` when it resolves inside ``root`` (see :func:`is_inside`), else :class:`PathEscapeError`.

    ``path`` need not exist: its existing leading part is resolved (a symbolic link there counts).
    """
    if not is_inside(path, root):
        raise PathEscapeError(f"refusing to write or delete {what} {path}: it resolves to {Path(path).resolve()}, "
                              f"outside {Path(root).resolve()} (a symbolic link points out of it)")
    return Path(path)


def default_storage(storage_path: str | None, folder: Path, root: Path) -> str:
    """Ray Train/Tune's storage: ``ray.storage_path`` when set (the user's explicit choice), else ``folder``
    (``<run>/ray_results`` or ``<sweep>/ray_results``) resolved, which must lie inside ``root``."""
    if storage_path:
        return storage_path
    return str(require_inside(folder, root, "Ray's storage folder").resolve())
