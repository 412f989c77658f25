"""Atomic writes and strict JSON: the way every file of a run is written (docs/architecture.md, "Run directory").

Files are written to a hidden temporary name in the target directory, fsync'ed and renamed with
``os.replace``, so a reader (or a resumed stage) sees either the old complete file or the new complete file,
never a torn one. Readers of a directory ignore names starting with ``.`` or ``_`` (the same rule as
``pyarrow.dataset``).

Nothing here imports pyarrow or numpy, so the command line's light modules (the config) can use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike


def _numpy() -> Any:
    """numpy when some module has imported it, else ``None``: a value can only be a numpy scalar or array once numpy
    is loaded, so this module never imports it itself (the command line's ``--help`` stays free of it)."""
    return sys.modules.get("numpy")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which would give
    files created meanwhile by other threads the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): read it by setting it, at once restored
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` (``mkdir``) would give a new file (directory): 0666 (0777) less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def fix_mode(path: PathLike) -> None:
    """Give ``path`` the umask's mode: safetensors (like ``mkstemp``) creates its files 0600 whatever the umask."""
    os.chmod(path, umask_mode())


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on clean exit fsync it and rename it to ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched (absent, or its old content).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; the file must get the mode any other file of the run gets (readable by the group
        # or others under umask 022: a run directory on shared storage, an MLflow server running as another user)
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Strict JSON: a non-finite float is written as ``null`` (bare ``NaN``/``Infinity`` are not JSON and most
    parsers reject them); callers that want the reason recorded use ``integrity.write_json_strict``."""
    text = json.dumps(strict_jsonable(obj), indent=indent, default=json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def strict_jsonable(obj: Any, path: str = "", reasons: dict[str, str] | None = None) -> Any:
    """``obj`` with every non-finite float (numpy scalars included) replaced by ``None``; the JSON path of each
    replaced value goes to ``reasons`` when given."""
    np = _numpy()
    if np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if reasons is not None:
            reasons[path or "$"] = f"not finite ({obj})"
        return None
    if isinstance(obj, Mapping):
        return {k: strict_jsonable(v, f"{path}.{k}" if path else str(k), reasons) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_jsonable(v, f"{path}[{i}]", reasons) for i, v in enumerate(obj)]
    if np is not None and isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return strict_jsonable(obj.tolist(), path, reasons)
    return obj


def read_json_strict(path: PathLike) -> Any:
    """``json.loads`` of a file that refuses bare ``NaN``/``Infinity`` (not JSON), naming the file."""

    def refuse(token: str) -> Any:
        raise ValueError(f"{path}: non-finite number {token} (not valid JSON)")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


def json_default(obj: Any) -> Any:
    """``json.dumps``' ``default``: paths as strings, numpy values as Python numbers or lists, sets sorted."""
    if isinstance(obj, Path):
        return str(obj)
    np = _numpy()
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if np is not None and isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy/torch scalars become Python numbers, anything else unknown a string."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
