"""The centre's receiving grid: every reply through the boundary, one timeline per reply, late replies dropped.

The ServerApp talks to the federation through this grid. It polls every
``federation.poll_interval_s`` and sends a message again when the SuperLink
says it never reached its site (common/flower/grid.py ``PollingGrid``, where
the work-around for Flower's fixed 3 s poll lives). Here is fedseg's policy
on top:

- every reply passes the receiving boundary (server/inbound.py) before its
  timeline is written or anything above reads it, and every event names the
  site registered for the node the message went to, never a name the reply
  claims;
- for every reply a ``timeline`` event goes to the metrics log: the moments
  the message passed each stage, in seconds after the ServerApp created it.
  The site's stages arrive as numeric metrics of the reply
  (``common.keys.TIMELINE_METRICS``, Unix times on the site's clock); the rest
  are the server's own clock;
- a reply that arrives after its round's deadline is logged as a
  ``late-reply`` event and never handed to a later round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from common import keys
from common.flower.grid import PollingGrid
from common.metrics_log import Event, MetricsLog
from common.wire import message_round

from .inbound import Inbox, finite_number
from .site_registry import read_nodes

log = logging.getLogger("fedseg.server")

STAGES = (
    "pulled_by_supernode",
    "process_started",
    "bundle_checked",
    "imports_done",
    "data_ready",
    "work_done",
    "reply_sent",
    "reply_pulled",
)
"""The timeline event's stages, in the order a message passes them."""
SITE_STAGES = dict(zip(STAGES[:6], keys.TIMELINE_METRICS, strict=True))
"""Stage -> the reply metric that carries it (the site's clock)."""


@dataclass(frozen=True)
class Sent:
    """What the grid remembers of a message it pushed, until its reply comes or forever if it is lost."""

    created: float
    stage: str
    round: int | None
    node: int


def timeline(sent: Sent, reply: Message, pulled: float) -> dict[str, float | None]:
    """Seconds after the message's creation at which it passed each stage (None: not reported)."""
    metrics = reply.content.metric_records.get(keys.METRICS) if reply.has_content() else None
    reported = {stage: metrics.get(key) if metrics is not None else None for stage, key in SITE_STAGES.items()}
    stamps = {stage: float(value) if finite_number(value) else None for stage, value in reported.items()}
    stamps |= {"reply_sent": reply.metadata.created_at, "reply_pulled": pulled}
    return {stage: None if t is None else round(t - sent.created, 3) for stage, t in stamps.items()}


class ReceivingGrid(PollingGrid):
    """A polling Grid (every ``poll_s``) whose replies pass the boundary and are timed; late ones are dropped."""

    def __init__(self, grid: Grid, metrics_log: MetricsLog, poll_s: float, inbox: Inbox | None = None) -> None:
        """``inbox``: the receiving boundary, sharing the strategy's node -> site names; by default one over the
        sites registered in the metrics log's run folder."""
        super().__init__(grid, poll_s)
        self._log = metrics_log
        run = metrics_log.path.parent
        self.inbox = inbox if inbox is not None else Inbox(read_nodes(run), run)
        self._sent: dict[str, Sent] = {}
        self._late: set[str] = set()
        """Messages whose deadline passed without a reply: a reply that still comes is logged and dropped."""
        self._current_round: int | None = None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        # strict=False: Flower returns fewer ids than messages when a push fails (none for an oversized payload).
        for message_id, msg in zip(ids, messages, strict=False):
            self._sent[message_id] = Sent(
                msg.metadata.created_at, msg.metadata.message_type, message_round(msg), msg.metadata.dst_node_id
            )
            self._current_round = message_round(msg) if message_round(msg) is not None else self._current_round
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to ``message_ids``; late replies to earlier messages are logged and held back."""
        wanted = set(message_ids)
        replies = []
        for reply in self._grid.pull_messages(wanted | self._late):
            sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
            node = sent.node if sent is not None else reply.metadata.src_node_id
            reply = self.inbox.receive(reply, node)
            site = self.inbox.site(node)
            if reply.metadata.reply_to_message_id in self._late:
                self._late.discard(reply.metadata.reply_to_message_id)
                self._log_late(sent, site)
                continue
            if sent is not None:
                self._log.write(
                    Event.TIMELINE,
                    round=sent.round,
                    site=site,
                    stage=sent.stage,
                    created=sent.created,
                    **timeline(sent, reply, time.time()),
                )
            replies.append(reply)
        return replies

    def _log_late(self, sent: Sent | None, site: str) -> None:
        log.warning(
            "a late %s reply of site %s (round %s) arrived after its deadline; not used",
            sent.stage if sent else "?",
            site,
            sent.round if sent else "?",
        )
        self._log.write(
            Event.LATE_REPLY,
            round=self._current_round,
            site=site,
            stage=sent.stage if sent else None,
            for_round=sent.round if sent else None,
            late_by_s=round(time.time() - sent.created, 3) if sent else None,
        )

    def resending(self, message: Message) -> None:
        log.warning(
            "a %s message did not reach site %s; sending it again",
            message.metadata.message_type,
            self.inbox.site(message.metadata.dst_node_id),
        )

    def unanswered(self, message_ids: set[str]) -> None:
        """Remember them as late: a reply that still comes is logged and never handed to a later round."""
        self._late |= message_ids
