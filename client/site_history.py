"""What this site did, round by round, kept at the site for ``fedseg-client status``.

One JSON line per reply: the stage, the server round, the numeric metrics,
the size of the arrays it sent and the reply's content digest (common/digest.py,
the same one its egress.jsonl and the server's metrics log hold). It stays in the site's state folder
and never travels; the server keeps its own log of what it received.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import Message

from common import keys
from common.digest import message_sha256
from common.files import read_jsonl
from common.runs import HISTORY_FILE


def record_reply(state_root: Path, msg: Message, reply: Message) -> None:
    """Append ``reply``, the answer to ``msg`` that left this site."""
    arrays = reply.content.array_records.get(keys.ARRAYS)
    config = msg.content.config_records.get(keys.CONFIG)
    value = config.get(keys.SERVER_ROUND) if config else None
    server_round = value if isinstance(value, int) else None  # an int: client/inbound.py checked it on arrival
    entry = {
        "time": time.time(),
        "stage": msg.metadata.message_type,
        "round": server_round,
        "metrics": dict(reply.content.metric_records.get(keys.METRICS, {})),
        "bytes_sent": arrays.count_bytes() if arrays is not None else 0,
        keys.CONTENT_SHA256: message_sha256(reply),
    }
    with (Path(state_root) / HISTORY_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def read(state_root: Path) -> Iterator[dict[str, Any]]:
    return read_jsonl(Path(state_root) / HISTORY_FILE)
