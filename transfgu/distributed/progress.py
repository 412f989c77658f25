"""Progress of work that runs inside one Ray task, shown by the driver.

A Ray task's console is not the user's (the executor starts Ray with ``log_to_driver=False``), so a stage that runs
as one long task (TransFGU's evaluation) would be silent for minutes. The task reports its
:class:`transfgu.logs.Progress` counts to a small relay actor (:func:`transfgu.logs.progress_sink`); the driver polls
the relay while it waits for the task and mirrors every bar with a :class:`~transfgu.logs.Progress` of its own: a bar
on a terminal, a status line every 10 s in a job log, the final count in ``pipeline.log``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transfgu.logs import Progress, ProgressSink

#: How often the driver asks the relay for the task's counts while it waits.
POLL_S = 1.0


class ProgressRelay:
    """The last ``(stage, done, total)`` of every bar of the watched task, by the bar's id (a Ray actor); ids count
    up in the order the task started its bars."""

    def __init__(self) -> None:
        self._bars: dict[int, tuple[str, int, int]] = {}

    def update(self, bar: int, stage: str, done: int, total: int) -> None:
        self._bars[bar] = (stage, int(done), int(total))

    def snapshot(self) -> list[tuple[int, str, int, int]]:
        return [(bar, *state) for bar, state in self._bars.items()]


def relay_sink(relay: Any) -> ProgressSink:
    """The task's side: a :data:`transfgu.logs.ProgressSink` that sends each count to ``relay`` (fire and forget)."""

    def send(bar: int, stage: str, done: int, total: int) -> None:
        relay.update.remote(bar, stage, done, total)

    return send


def run_with_progress(start: Callable[[Any], Any], poll_s: float = POLL_S) -> Any:
    """``start(relay)`` launches the task (giving it the relay's handle) and returns its object ref; this waits for the
    task, shows its bars while it runs, and returns its result (a failed task raises here, as ``ray.get`` does)."""
    import ray

    relay = ray.remote(num_cpus=0)(ProgressRelay).options(scheduling_strategy="DEFAULT").remote()
    ref = start(relay)
    mirrors: dict[int, Progress] = {}

    def mirror() -> None:
        for bar, stage, done, total in sorted(ray.get(relay.snapshot.remote())):
            prog = mirrors.get(bar)
            if prog is None:
                for older in mirrors.values():  # the task's bars run one after the other: a new one ends the rest
                    older.close()
                prog = mirrors[bar] = Progress(stage, total, heartbeat=True)
            if done > prog.done:
                prog.update(done - prog.done)
            if done >= total:
                prog.close()

    try:
        while not ray.wait([ref], timeout=poll_s)[0]:
            mirror()
        mirror()  # the counts sent just before the task ended
        return ray.get(ref)
    finally:
        for prog in mirrors.values():
            prog.close()
        ray.kill(relay)
