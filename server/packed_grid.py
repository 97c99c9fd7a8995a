"""The run's grid, with every message packed for travel and every reply unpacked (common/wire.py).

A message's model travels as one flat array per dtype instead of one Flower
object per tensor: in a deployment each object is an HTTPS request through
the gateway, so a model of n tensors costs 2n + 1 requests each way unpacked
and about three packed. Everything above this grid (planning, the strategy,
validation, cross-site evaluation) sees the named tensors only. The wrapping
itself is common/flower/grid.py's ``MappingGrid``.
"""

from __future__ import annotations

import logging

from flwr.app import Message
from flwr.serverapp import Grid

from common.flower.grid import MappingGrid
from common.wire import pack, unpack

from .inbound import UNPACKABLE, error_reply

log = logging.getLogger("fedseg.server")


def packed(msg: Message) -> Message:
    """The message with its arrays packed for travel."""
    if msg.has_content():
        msg.content = pack(msg.content)
    return msg


def unpacked(reply: Message) -> Message:
    """The reply with named tensors, or an error reply with a fixed reason when it does not unpack; never raises.

    Whatever a packed reply holds (a layout that lies, an array of an unknown stype, bytes that are not an .npy
    file, an empty tensor declared with a shape too large to exist) ends here as a failed reply of its node,
    which every stage above leaves out like any other failure (server/inbound.py names its site).
    """
    if reply.has_content():
        try:
            reply.content = unpack(reply.content)
        except Exception as err:  # noqa: BLE001 - one site's bytes must never end the run
            log.warning(
                "a reply of node %s does not unpack (%s); it will be left out",
                reply.metadata.src_node_id,
                type(err).__name__,
            )
            return error_reply(reply, UNPACKABLE)
    return reply


class PackedGrid(MappingGrid):
    """A grid that packs what it sends and unpacks what it receives; it hides no node."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid, outgoing=packed, incoming=unpacked)
