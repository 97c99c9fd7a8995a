"""The per-round metrics log: append-only JSON Lines, durable after every round.

Readers may open the file while a run is going on; a line is only ever
appended whole, and ``sync()`` fsyncs at the end of each round so a crash
loses at most the round in progress.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import read_jsonl
from .runs import METRICS_FILE


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

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": time.time(), **_jsonable(fields)}
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


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Events of a metrics log, skipping a trailing line that is still being written."""
    return read_jsonl(path)
