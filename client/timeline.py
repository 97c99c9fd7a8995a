"""The site's half of a round's timeline: when a message passed each stage here, as Unix times.

The SuperNode (client/supernode.py) notes when it pulled each message in
``<state_dir>/pulled/<message id>``. The ClientApp process is started by the
launcher (client/warm_start.py), which notes the moment in ``PROCESS_STARTED_ENV``; the bundle guard notes the moment
it accepted the bundle in ``BUNDLE_CHECKED_ENV``. The handler adds when it was
entered (every import done), when the data was ready and when the work was
done. Only these numbers leave the site, as metrics named in
``common.keys.TIMELINE_METRICS``; the server turns them into the ``timeline``
event (server/receiving_grid.py). In the simulation there is no launcher and no
guard, so those two stages are absent, and the pull time is the in-memory
SuperLink's own ``delivered_at``.

The message id comes from the SuperLink, so from the centre: it names a note
only when it is what Flower makes it (the message's object id, 64 lowercase hex
digits). Anything else (``../egress.jsonl``, ``yaml.py``, an absolute path)
names no file at all, so a compromised or impersonated centre cannot make the
SuperNode or the ClientApp write or delete a file of its choosing.
"""

from __future__ import annotations

import math
import os
import re
import time
from datetime import datetime
from pathlib import Path

from flwr.app import Message

from common import keys
from common.runs import PULLED_DIR

from .bundle_guard import CHECKED_AT_ENV as BUNDLE_CHECKED_ENV
from .warm_start import PROCESS_STARTED_ENV

DELIVERED, STARTED, CHECKED, IMPORTED, DATA_READY, WORK_DONE = keys.TIMELINE_METRICS
MESSAGE_ID = re.compile(r"[0-9a-f]{64}")
"""A Flower message id: the sha256 object id of the message. The only ids that may name a file."""


def pull_note(state_dir: Path, message_id: object) -> Path | None:
    """The file that notes when ``message_id`` was pulled, or None when the id is not a Flower message id."""
    if not isinstance(message_id, str) or MESSAGE_ID.fullmatch(message_id) is None:
        return None
    return Path(state_dir) / PULLED_DIR / message_id


def _env_time(name: str) -> float | None:
    try:
        value = float(os.environ[name])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def pulled_at(state_dir: Path, msg: Message) -> dict[str, float]:
    """The SuperNode's pull time of ``msg``, if it noted one (never for an id that is not Flower's)."""
    path = pull_note(state_dir, msg.metadata.message_id)
    if path is None:
        return {}
    try:
        stamp = float(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return {}
    return {DELIVERED: stamp} if math.isfinite(stamp) else {}


def _delivered(msg: Message) -> float | None:
    """When the SuperNode pulled the message (the SuperLink stamps it as ISO 8601)."""
    try:
        return datetime.fromisoformat(msg.metadata.delivered_at).timestamp() if msg.metadata.delivered_at else None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError):
        return None


def start(msg: Message) -> dict[str, float]:
    """The stages a message passed before its handler began, plus the handler's own start."""
    marks = {
        DELIVERED: _delivered(msg),
        STARTED: _env_time(PROCESS_STARTED_ENV),
        CHECKED: _env_time(BUNDLE_CHECKED_ENV),
        IMPORTED: time.time(),
    }
    return {k: v for k, v in marks.items() if v is not None}


def mark(marks: dict[str, float], stage: str) -> None:
    marks[stage] = time.time()
