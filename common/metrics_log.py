"""The per-round metrics log: append-only JSON Lines, durable after every round.

Readers may open the file while a run is going on; a line is only ever
appended whole, and ``sync()`` fsyncs at the end of each round so a crash
loses at most the round in progress. Every kind of line is an ``Event``
(docs/metrics-log.md documents each one's fields): writers name it by its
member, readers select by it, so a misspelt event is an AttributeError
rather than a line no reader ever finds.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from .files import read_jsonl
from .runs import METRICS_FILE


class Event(StrEnum):
    """The kinds of line in metrics.jsonl, as written in its ``event`` field (docs/metrics-log.md)."""

    RUN_START = "run-start"
    CONFIG_CHANGE = "config-change"
    PLAN = "plan"
    INIT_WEIGHTS = "init-weights"
    TRAIN = "train"
    EVALUATE = "evaluate"
    ROUND = "round"
    PRIVACY = "privacy"
    CROSS_EVAL = "cross-eval"
    FAILURE = "failure"
    NO_SCORE = "no-score"
    TIMELINE = "timeline"
    LATE_REPLY = "late-reply"
    QUORUM_FAILURE = "quorum-failure"
    RUN_END = "run-end"


EVENT, TIME = "event", "time"
"""The fields of every line: its kind and when it was written (Unix seconds)."""


def _jsonable(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN, and a reader must never choke."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class MetricsLog:
    """Appends events to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, event: Event, **fields: Any) -> dict[str, Any]:
        """Append one ``event`` line with ``fields`` and the time; an event not declared in ``Event`` is refused."""
        record = {EVENT: str(Event(event)), TIME: time.time(), **_jsonable(fields)}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        return record

    def sync(self) -> None:
        """Make everything written so far durable (end of a round)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.sync()
        self._file.close()


def read_events(path: Path, *kinds: Event) -> Iterator[dict[str, Any]]:
    """Events of a metrics log (only those of ``kinds`` when given), skipping a trailing line still being written."""
    return of_kind(read_jsonl(path), *kinds) if kinds else read_jsonl(path)


def of_kind(events: Iterable[dict[str, Any]], *kinds: Event) -> Iterator[dict[str, Any]]:
    """The events of ``kinds`` among ``events``."""
    return (e for e in events if e.get(EVENT) in kinds)


def is_kind(event: dict[str, Any], kind: Event) -> bool:
    return event.get(EVENT) == kind


def by_kind(events: Iterable[dict[str, Any]]) -> dict[Event, list[dict[str, Any]]]:
    """Events grouped by kind, in log order; a kind with no event maps to [] (a line of an unknown kind is left out)."""
    kinds: dict[Event, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event.get(EVENT) in Event.__members__.values():
            kinds[Event(event[EVENT])].append(event)
    return kinds
