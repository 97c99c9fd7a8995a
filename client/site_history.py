"""What this site did, round by round, kept at the site for ``fedseg-client status``.

One JSON line per reply: the stage, the server round, the numeric metrics and
the size and digest of the arrays it sent. It stays in the site's state folder
and never travels; the server keeps its own log of what it received.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message

from common import keys
from common.files import read_jsonl
from common.runs import HISTORY_FILE


def record_reply(state_root: Path, msg: Message, metrics: dict[str, Any], arrays: ArrayRecord | None) -> None:
    """Append the reply to ``msg`` that this site is about to send."""
    array_bytes, array_digest = digest_arrays(arrays)
    config = msg.content.config_records.get(keys.CONFIG)
    server_round = int(config[keys.SERVER_ROUND]) if config and keys.SERVER_ROUND in config else None
    entry = {"time": time.time(), "stage": msg.metadata.message_type, "round": server_round,
             "metrics": metrics, "bytes_sent": array_bytes, "arrays_sha256": array_digest}
    with (Path(state_root) / HISTORY_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def digest_arrays(arrays: ArrayRecord | None) -> tuple[int, str | None]:
    """(bytes, sha256) of an ArrayRecord's tensors in key order; (0, None) when nothing is sent."""
    if arrays is None:
        return 0, None
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        h.update(key.encode())
        h.update(arrays[key].data)
    return arrays.count_bytes(), h.hexdigest()


def read(state_root: Path) -> Iterator[dict[str, Any]]:
    return read_jsonl(Path(state_root) / HISTORY_FILE)
