"""The site's half of a round's timeline: when a message passed each stage here, as Unix times.

The SuperNode (client/supernode.py) notes when it pulled each message in
``<state_dir>/pulled/<message id>``. The ClientApp process is started by the
launcher (client/warm_start.py), which notes the moment in ``PROCESS_STARTED_ENV``; the bundle guard notes the moment
it accepted the bundle in ``BUNDLE_CHECKED_ENV``. The handler adds when it was
entered (every import done), when the data was ready and when the work was
done. Only these numbers leave the site, as metrics named in
``common.keys.TIMELINE_METRICS``; the server turns them into the ``timeline``
event (server/timeline.py). In the simulation there is no launcher and no
guard, so those two stages are absent, and the pull time is the in-memory
SuperLink's own ``delivered_at``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from flwr.app import Message

from common import keys
from common.runs import PULLED_DIR

from .bundle_guard import CHECKED_AT_ENV as BUNDLE_CHECKED_ENV
from .warm_start import PROCESS_STARTED_ENV

DELIVERED, STARTED, CHECKED, IMPORTED, DATA_READY, WORK_DONE = keys.TIMELINE_METRICS


def _env_time(name: str) -> float | None:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def pulled_at(state_dir: Path, msg: Message) -> dict[str, float]:
    """The SuperNode's pull time of ``msg``, if it noted one."""
    path = Path(state_dir) / PULLED_DIR / msg.metadata.message_id
    try:
        stamp = float(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return {}
    return {DELIVERED: stamp}


def _delivered(msg: Message) -> float | None:
    """When the SuperNode pulled the message (the SuperLink stamps it as ISO 8601)."""
    try:
        return datetime.fromisoformat(msg.metadata.delivered_at).timestamp() if msg.metadata.delivered_at else None
    except (ValueError, KeyError, AttributeError):
        return None


def start(msg: Message) -> dict[str, float]:
    """The stages a message passed before its handler began, plus the handler's own start."""
    marks = {DELIVERED: _delivered(msg), STARTED: _env_time(PROCESS_STARTED_ENV),
             CHECKED: _env_time(BUNDLE_CHECKED_ENV), IMPORTED: time.time()}
    return {k: v for k, v in marks.items() if v is not None}


def mark(marks: dict[str, float], stage: str) -> None:
    marks[stage] = time.time()
