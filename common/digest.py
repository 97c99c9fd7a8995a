"""One digest of a message's content, computed the same way at the site and at the server.

A site records the digest of every reply in its egress.jsonl and the server
logs the digest of every reply it aggregates, so a privacy officer can prove
that what the server used is exactly what left the site. The digest is
Flower's own content address: the SHA-256 object id of the RecordDict, a
Merkle hash over every record's keys and values down to each array chunk.
Flower recomputes it after transport, so no second serialization is needed.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict


def content_sha256(content: RecordDict) -> str:
    """SHA-256 (hex) of everything a message carries: arrays, metrics and config records."""
    return content.object_id


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content (array data, metric and config values, keys)."""
    return sum(record.count_bytes() for record in content.values())


def message_sha256(msg: Message) -> str | None:
    """The content digest of a reply, or None for an error reply (it carries no content)."""
    return content_sha256(msg.content) if msg.has_content() else None
