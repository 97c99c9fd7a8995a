"""The wire format: one ArrayRecord of travelling tensors, optionally in half precision.

Arrays may travel as float16 to halve the bytes; they are always returned as
float32, so aggregation and training never run in half precision. (bfloat16 is
not offered: Flower's ArrayRecord stores numpy arrays, and numpy has no
bfloat16.)
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message

from . import keys

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_wire(tensors: dict[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Pack tensors into an ArrayRecord, casting floating tensors to ``wire_dtype``."""
    dtype = WIRE_DTYPES[wire_dtype]
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    return ArrayRecord(cast)


def from_wire(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into float32 (floating) tensors."""
    state = record.to_torch_state_dict()
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


ERROR_PREFIX = "site "
ERROR_SEPARATOR = ": "


def error_reason(site: str, reason: str) -> str:
    """A site's error text: Flower error replies carry no records, so the name leads the reason."""
    return f"{ERROR_PREFIX}{site}{ERROR_SEPARATOR}{reason}"


def site_of_error(reason: str | None) -> str | None:
    """The site name that ``error_reason`` put in front, if any."""
    if not reason or not reason.startswith(ERROR_PREFIX) or ERROR_SEPARATOR not in reason:
        return None
    name = reason[len(ERROR_PREFIX):].split(ERROR_SEPARATOR, 1)[0]
    return name if name and " " not in name else None


def named_site(msg: Message) -> str | None:
    """The site a reply names: in its identity record, or at the front of its error text."""
    if msg.has_content() and keys.IDENTITY in msg.content.config_records:
        return str(msg.content.config_records[keys.IDENTITY].get(keys.SITE))
    return site_of_error(msg.error.reason) if msg.has_error() else None


def reply_site(msg: Message) -> str:
    """The site that sent a reply, or its node id when the reply names none."""
    return named_site(msg) or f"node-{msg.metadata.src_node_id}"
