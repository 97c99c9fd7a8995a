"""Grid decorators: a Grid that wraps the run's Grid, and one that polls and sends again what never arrived.

Flower's ``Grid`` (public, ``flwr.serverapp``) is what a ServerApp talks to
the federation through. fedseg stacks decorators on it (packing, the
receiving boundary, hiding held-out nodes); each is a :class:`DelegatingGrid`
that overrides what it changes. :class:`PollingGrid` re-implements
``send_and_receive``, which Flower 1.42's deployed grid runs with a fixed 3 s
poll and no second try; it relies on Flower's internal codes for a message the
SuperLink could not deliver (:data:`.constants.UNDELIVERED`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from .constants import SUPERLINK_NODE_ID, UNDELIVERED

log = logging.getLogger("fedseg.common")

MAX_RESENDS = 3
"""Times one message is sent again to a node in one step; a node that keeps going away fails by its name."""


class DelegatingGrid(Grid):
    """A Grid that passes every call to the wrapped ``grid``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class MappingGrid(DelegatingGrid):
    """A Grid that passes every message it sends through ``outgoing`` and every reply through ``incoming``."""

    def __init__(
        self, grid: Grid, outgoing: Callable[[Message], Message], incoming: Callable[[Message], Message]
    ) -> None:
        super().__init__(grid)
        self._outgoing, self._incoming = outgoing, incoming

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages([self._outgoing(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._incoming(r) for r in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = self._grid.send_and_receive([self._outgoing(m) for m in messages], timeout=timeout)
        return [self._incoming(r) for r in replies]


def undelivered(reply: Message) -> bool:
    """Whether the SuperLink itself answered that the message never reached its node (a site cannot say so:
    an error a site sends with such a code is that site's failure, not a reason to send the message again)."""
    return reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID and reply.error.code in UNDELIVERED


class PollingGrid(DelegatingGrid):
    """Flower's send-and-receive over this grid's own push and pull, polling every ``poll_s``.

    A message that never reached its node (the SuperLink answers for a node
    that stopped reporting, as a restarted SuperNode's old node does) is sent
    again once that node is connected, within the same deadline, at most
    ``MAX_RESENDS`` times; only if it never comes back is the SuperLink's
    answer the node's reply. The ids still unanswered at the deadline go to
    :meth:`unanswered`.
    """

    def __init__(self, grid: Grid, poll_s: float) -> None:
        super().__init__(grid)
        self._poll_s = poll_s

    def resending(self, message: Message) -> None:
        """Called before ``message`` (one that never arrived) is sent again to its node."""
        log.warning(
            "a %s message did not reach node %s; sending it again",
            message.metadata.message_type,
            message.metadata.dst_node_id,
        )

    def unanswered(self, message_ids: set[str]) -> None:
        """Called with the messages whose deadline passed without a reply; by default nothing is done."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        # strict=False: Flower returns fewer ids than messages when a push fails (none for an oversized payload).
        originals = dict(zip(self.push_messages(messages), messages, strict=False))
        pending = set(originals)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        waiting: dict[int, tuple[Message, Message]] = {}
        """Node -> (the message it never got, the SuperLink's answer), waiting for the node to come back."""
        resent: list[int] = []
        while pending or waiting:
            for reply in self.pull_messages(pending):
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                original = originals.get(message_id)
                if (
                    original is not None
                    and undelivered(reply)
                    and resent.count(original.metadata.dst_node_id) < MAX_RESENDS
                ):
                    waiting[original.metadata.dst_node_id] = (original, reply)
                else:
                    replies.append(reply)
            online = set(self.get_node_ids()) if waiting else set()
            for node in [n for n in waiting if n in online]:
                original, _ = waiting.pop(node)
                self.resending(original)
                again = Message(
                    original.content, node, original.metadata.message_type, group_id=original.metadata.group_id
                )
                (message_id,) = self.push_messages([again])
                originals[message_id] = again
                pending.add(message_id)
                resent.append(node)
            if (deadline is None and not pending) or (deadline is not None and time.monotonic() >= deadline):
                break  # without a deadline, a node that left is not waited for
            time.sleep(self._poll_s)
        self.unanswered(pending)
        return replies + [answer for _, answer in waiting.values()]
