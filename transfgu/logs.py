"""What a person sees while a run works: one log format, progress, and third-party noise turned down.

* :func:`setup_logging` -- ``HH:MM:SS LEVEL name: message`` on stderr (and the full log in ``pipeline.log``), Ray's and
  MLflow's console lines in the same format;
  library loggers (faiss's loader, Ray's internals, MLflow, urllib3, timm's hub) are set to WARNING unless
  ``verbose`` -- their INFO lines say nothing about the run. ``TRANSFGU_VERBOSE=1`` does the same as ``--verbose``
  in processes the CLI does not start (Ray workers).
* :class:`Progress` -- a tqdm bar on a terminal; elsewhere (job logs, CI) one line per ``min_interval_s`` seconds;
  in both cases one log line at the end, with counts, rate and ETA. In a process whose console nobody sees (a Ray
  task), :func:`progress_sink` also hands every count to a callback, which relays it to the driver
  (:mod:`transfgu.distributed.progress`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger("transfgu")

#: Libraries whose INFO/DEBUG lines are not about the run (quieted unless --verbose).
NOISY_LOGGERS = ("faiss", "faiss.loader", "ray", "ray.data", "ray.train", "ray.tune", "ray.air", "mlflow", "alembic",
                 "urllib3", "filelock", "timm", "huggingface_hub", "fsspec", "PIL", "matplotlib")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose_requested() -> bool:
    return os.environ.get("TRANSFGU_VERBOSE", "").lower() in ("1", "true", "yes")


def setup_logging(
    log_file: Path | None = None, level: int = logging.INFO, verbose: bool | None = None, worker: bool = False
) -> None:
    """Idempotent: one stderr handler per process, one file handler per log file.

    ``worker=True`` in Ray worker processes: Ray already prints the root logger there (and forwards it to the
    driver), so a second console handler would print every line twice.
    """
    verbose = verbose_requested() if verbose is None else verbose
    if verbose:
        os.environ["TRANSFGU_VERBOSE"] = "1"  # inherited by the Ray processes this one starts
    # MLflow attaches its own console handler (another timestamp format) when imported, unless told not to; its
    # records then reach ours, at the level quiet_libraries sets. Inherited by the Ray processes started later.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    quiet_warnings(verbose)
    root = logging.getLogger()
    ours = any(getattr(h, "_transfgu", False) for h in root.handlers)
    if not ours and not (worker and root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        h._transfgu = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else level)
    quiet_libraries(verbose)
    if log_file is not None:
        path = Path(log_file)
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter(_FORMAT))
            root.addHandler(fh)


@contextlib.contextmanager
def run_log_file(path: Path) -> Iterator[None]:
    """The run's full log in ``path`` for the duration of one run: the handler is removed afterwards, so a second
    run in the same process (a test session, a notebook, a Tune trial's driver) does not write into this file."""
    root = logging.getLogger()
    path = Path(path).resolve()
    if any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers):
        yield  # an outer caller holds it
        return
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(fh)
    try:
        yield
    finally:
        root.removeHandler(fh)
        fh.close()


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes`` (known, explained library lines)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


#: Ray Data warns once per process that its bars are off; they are off on purpose when stderr is not a terminal.
_RAY_DATA_BENIGN = _DropMessages(("Progress bars disabled", "Progress bars for operators disabled"))
#: Ray's notice that token authentication is on: nothing to do for the private local Ray a run starts (bound to
#: 127.0.0.1); a cluster's users need the token, which the README's cluster section explains.
_RAY_BENIGN = _DropMessages(("Token authentication is enabled for this Ray cluster",))
#: Library warnings that name no action for the user (docs/architecture.md, "What a run prints").
BENIGN_WARNINGS = (
    # MLflow resolving the source of a dataset input (a local folder) between two equal interpretations
    r"The specified dataset source can be interpreted in multiple ways",
)


def quiet_warnings(verbose: bool | None = None) -> None:
    """Python warnings of libraries that the user cannot act on are not shown (unless ``verbose``)."""
    if verbose_requested() if verbose is None else verbose:
        return
    for message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _our_format(handler: logging.Handler) -> None:
    """One timestamp format on the console: a library's own console handler gets ours."""
    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))


def quiet_libraries(verbose: bool | None = None) -> None:
    """Library loggers to WARNING (unless ``verbose``). Called again after Ray is imported or started: Ray
    configures its loggers on import, after ours, and Ray Train names some loggers by file path."""
    verbose = verbose_requested() if verbose is None else verbose
    names = list(NOISY_LOGGERS) + [n for n in logging.root.manager.loggerDict
                                   if n.startswith("ray.") or "/site-packages/ray/" in n]
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for h in logging.getLogger("ray").handlers:  # Ray's console handler (its own format; does not propagate)
        _our_format(h)
        if not verbose and _RAY_BENIGN not in h.filters:
            h.addFilter(_RAY_BENIGN)
    # Ray Data logs DEBUG to its own file (ray-data.log) and INFO to the console: keep the file, quiet the console.
    data = logging.getLogger("ray.data")
    if not verbose and data.handlers:
        data.setLevel(logging.DEBUG)
        for h in data.handlers:
            if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__:
                h.setLevel(logging.WARNING)
                _our_format(h)
                if _RAY_DATA_BENIGN not in h.filters:
                    h.addFilter(_RAY_DATA_BENIGN)


def _fmt(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(sec))


#: ``(bar id, stage, done, total)`` -> None, ids counting up as bars start: where this process's progress also goes
#: (see progress_sink).
ProgressSink = Callable[[int, str, int, int], None]
_sink: dict[str, ProgressSink | None] = {"fn": None}
_SINK_INTERVAL_S = 0.5  # at most two relayed counts a second per bar (and always the last one)
_bar_ids = itertools.count()  # a bar's id for the sink: in creation order, never reused (id() would be)


@contextlib.contextmanager
def progress_sink(fn: ProgressSink) -> Iterator[None]:
    """Within the block every :class:`Progress` of this process also reports ``(id, stage, done, total)`` to ``fn``
    (throttled to two calls a second, the final count always): how a Ray task's bars reach the driver's console."""
    before, _sink["fn"] = _sink["fn"], fn
    try:
        yield
    finally:
        _sink["fn"] = before


class Progress:
    """Progress of one stage over ``total`` items: a bar on a terminal, a periodic log line elsewhere.

    ``update(n, extra)`` after every piece of work; ``close()`` (or leaving the ``with`` block) ends the bar and
    logs the final count.
    """

    def __init__(self, stage: str, total: int, unit: str = "img", stream: IO[str] | None = None,
                 min_interval_s: float = 10.0, bar: bool | None = None, heartbeat: bool = False) -> None:
        """``heartbeat``: without a bar, also log the status line every ``min_interval_s`` while no work comes back
        (a Ray stage whose results arrive in a few large pieces), so a job log shows the stage is alive."""
        self.stage, self.total, self.unit = stage, int(total), unit
        self.done = 0
        self.start = time.time()
        self.min_interval_s = min_interval_s
        self._last_line = 0.0
        self._logged = -1  # the count of the last logged line
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._sink, self._sunk_at, self._id = _sink["fn"], 0.0, next(_bar_ids)
        self._relay()
        stream = stream if stream is not None else sys.stderr
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TRANSFGU_NO_BAR") is None
        self._bar = None
        if bar:
            try:  # tqdm comes with timm's and Ray's dependencies; without it, log lines as in job logs
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=self.total, desc=f"[{stage}]", unit=unit, file=stream, leave=False,
                             dynamic_ncols=True)
        if self._bar is None and heartbeat and math.isfinite(min_interval_s):
            self._last_line = self.start
            self._ticker = threading.Thread(target=self._tick, name=f"progress-{stage}", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.min_interval_s / 4):
            with self._lock:
                if time.time() - self._last_line >= self.min_interval_s:
                    self._last_line = time.time()
                    self._line()

    def _relay(self, final: bool = False) -> None:
        if self._sink is None:
            return
        now = time.time()
        if final or self.done >= self.total or now - self._sunk_at >= _SINK_INTERVAL_S:
            self._sunk_at = now
            with contextlib.suppress(Exception):  # a lost driver must not fail the work it watches
                self._sink(self._id, self.stage, self.done, self.total)

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        self._relay()
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix_str(extra, refresh=False)
            return
        with self._lock:
            now = time.time()
            if self.done < self.total and now - self._last_line < self.min_interval_s:
                return
            self._last_line = now
            self._line(extra)

    def _line(self, extra: str = "") -> None:
        self._logged = self.done
        el = time.time() - self.start
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        log.info("[%s] %d/%d (%.1f%%) %.2f %s/s eta %s %s", self.stage, self.done, self.total,
                 100.0 * self.done / max(self.total, 1), rate, self.unit, _fmt(eta), extra)

    def close(self) -> None:
        """End the bar; the final count always reaches the log (and so ``pipeline.log``)."""
        self._relay(final=True)
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._logged != self.done:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
