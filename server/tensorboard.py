"""The centre's metrics log mirrored to TensorBoard event files, for a finished run or live.

    fedseg-server report RUN --tensorboard [DIR]      # a finished (or running) run, once
    federation.tensorboard: true                      # live, in <run>/tensorboard, as the recorder writes the log

TensorBoard is a view of ``metrics.jsonl``, never a second record: every
scalar is one number the log holds, under a tag that says where it came from,
so a reader can always go back to the line. The rule (``scalars``), one for
both ways of writing:

- the step is the event's ``round`` (0 for an event without one, such as
  ``cross-eval`` or ``run-end``), the wall time its ``time``;
- every other number of the event is a scalar (booleans and text are not), and
  the i-th number of a list is one too (``dice_per_class``);
- the tag is ``<event>/<field>[/<i>]``, then the event's ``stage``, ``model``
  and ``site`` where it has them: ``evaluate/dice/site-1``,
  ``timeline/work_done/train/site-2``, ``round/dice_weighted``.

A live mirror rebuilds itself from the log when it opens: a resumed run's log
has had its unfinished round dropped (server/resume.py), and the mirror must
not keep what the log no longer holds. The folder is the mirror's own.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from common.metrics_log import EVENT, TIME, Event, MetricsLog, read_events
from common.runs import METRICS_FILE, REPORT_DIR, TENSORBOARD_DIR

log = logging.getLogger("fedseg.server")

EVENT_FILE_PREFIX = "events.out.tfevents."
STEP_FIELD, TIME_FIELD, EVENT_FIELD = "round", TIME, EVENT
QUALIFIERS = ("stage", "model", "site")
"""Text fields that tell apart the events of one kind in one round, appended to the tag in this order."""


class TensorBoardError(ValueError):
    """The event files cannot be written where asked: the message says why and what to do."""


@dataclass(frozen=True)
class Scalar:
    tag: str
    value: float
    step: int
    wall_time: float | None


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def scalars(event: dict[str, Any]) -> Iterator[Scalar]:
    """The scalars one metrics log event becomes (the rule of the module docstring)."""
    kind = event.get(EVENT_FIELD)
    if not isinstance(kind, str):
        return
    step = event.get(STEP_FIELD)
    step = int(step) if _number(step) else 0
    wall = event.get(TIME_FIELD)
    wall = float(wall) if _number(wall) else None
    suffix = "".join(f"/{event[q]}" for q in QUALIFIERS if isinstance(event.get(q), str))
    for name, value in event.items():
        if name in (EVENT_FIELD, STEP_FIELD, TIME_FIELD):
            continue
        if _number(value):
            yield Scalar(f"{kind}/{name}{suffix}", float(value), step, wall)
        elif isinstance(value, list):
            yield from (
                Scalar(f"{kind}/{name}/{i}{suffix}", float(v), step, wall) for i, v in enumerate(value) if _number(v)
            )


class Mirror:
    """Writes scalars of metrics log events to one TensorBoard event file in ``folder``."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._writer = SummaryWriter(log_dir=str(folder), max_queue=1000, flush_secs=60)

    def add(self, events: Iterable[dict[str, Any]]) -> int:
        """Mirror ``events``; returns how many scalars were written."""
        written = 0
        for event in events:
            for s in scalars(event):
                self._writer.add_scalar(s.tag, s.value, s.step, walltime=s.wall_time)
                written += 1
        return written

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(EVENT_FILE_PREFIX + "*")) if folder.is_dir() else []


def write_mirror(run: Path, folder: Path | None = None) -> tuple[Path, int]:
    """Mirror ``<run>/metrics.jsonl`` into ``folder`` (default ``<run>/report/tensorboard``) once.

    A folder that already holds event files is refused: TensorBoard would show
    every number twice, once per file. Returns the folder and the scalar count.
    """
    folder = Path(folder) if folder is not None else Path(run) / REPORT_DIR / TENSORBOARD_DIR
    if old := event_files(folder):
        raise TensorBoardError(
            f"{folder} already holds TensorBoard event files ({old[0].name}, ...): TensorBoard "
            "would show every number twice. Delete them, or give --tensorboard another folder."
        )
    mirror = Mirror(folder)
    try:
        count = mirror.add(read_events(Path(run) / METRICS_FILE))
    finally:
        mirror.close()
    return folder, count


class MirroredLog(MetricsLog):
    """The run's metrics log, with every line it writes mirrored live to ``<run>/tensorboard``.

    The mirror is flushed with the log at the end of every round (``sync``), so
    TensorBoard follows the run round by round.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        folder = Path(run_dir) / TENSORBOARD_DIR
        for old in event_files(folder):  # the log is the record: start the mirror again from it
            old.unlink()
        self.mirror = Mirror(folder)
        self.mirror.add(read_events(self.path))
        self.mirror.flush()
        log.info("TensorBoard: %s mirrors %s (tensorboard --logdir %s)", folder, self.path, folder)

    def write(self, event: Event, **fields: Any) -> dict[str, Any]:
        record = super().write(event, **fields)
        self.mirror.add([record])
        return record

    def sync(self) -> None:
        super().sync()
        self.mirror.flush()

    def close(self) -> None:
        super().close()
        self.mirror.close()


def open_log(run_dir: Path, tensorboard: bool) -> MetricsLog:
    """The run's metrics log, mirrored live to TensorBoard when ``federation.tensorboard`` is on."""
    return MirroredLog(run_dir) if tensorboard else MetricsLog(run_dir)
