"""Flower Messages from the server to a site, and their replies, built without a SuperLink.

Outside a running SuperLink no run identity is set, so messages are built from explicit Metadata, exactly as
Flower's own message factory does. Only Flower is imported: a subprocess that needs one message (the bundle
guard's probe) starts in a second, without torch or MONAI.
"""

from __future__ import annotations

import hashlib
import time
import uuid

from flwr.app import Error, Message, Metadata, RecordDict
from flwr.app.message.message import make_message

SERVER_NODE = 1
TTL_S = 600.0


def incoming(content: RecordDict, message_type: str, node_id: int, server_round: int | str = 1) -> Message:
    """A message from the server to site ``node_id``, with an id of Flower's form (64 hex digits)."""
    metadata = Metadata(
        run_id=1,
        message_id=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        src_node_id=SERVER_NODE,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=TTL_S,
        message_type=message_type,
    )
    return make_message(metadata, content)


def reply(content: RecordDict | Error, node_id: int, message_type: str, server_round: int = 1) -> Message:
    """What site ``node_id`` sends back: content, or an error."""
    request = incoming(RecordDict(), message_type, node_id, server_round)
    return Message(content, reply_to=request)
