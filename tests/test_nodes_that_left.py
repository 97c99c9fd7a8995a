"""A message the SuperLink could not deliver (the site's node went away) is sent again once the site is back."""

from __future__ import annotations

import copy

from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from common import keys
from common.metrics_log import MetricsLog
from server.receiving_grid import ReceivingGrid
from tests.helpers.local_grid import InProcessGrid, stamp

RETURNS, NEVER = 12, 13
"""Node ids (the SuperLink's own is 1): one site whose daemon restarts, one that never comes back."""


class RestartingSites(InProcessGrid):
    """Node 12's first message meets a stale node (the SuperLink answers for it), then node 12 is back;
    node 13 is gone for good. Every other message is answered by its site."""

    def __init__(self) -> None:
        super().__init__([11, RETURNS, NEVER])
        self.replies: dict[str, Message] = {}
        self.sent_to: list[int] = []

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            stamp(msg)
            node = msg.metadata.dst_node_id
            self.sent_to.append(node)
            if node == NEVER or (node == RETURNS and self.sent_to.count(RETURNS) == 1):
                metadata = copy.copy(msg.metadata)
                metadata.__dict__.update(_src_node_id=SUPERLINK_NODE_ID, _reply_to_message_id=msg.metadata.message_id)
                reply = make_message(metadata, error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"))
                if node == NEVER:
                    self.nodes = [n for n in self.nodes if n != NEVER]
            else:
                reply = stamp(Message(RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})}), reply_to=msg))
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the timeline grid pushes and polls itself")


def test_a_site_whose_node_went_away_gets_the_message_again_and_one_that_never_returns_fails_by_name(tmp_path):
    grid = RestartingSites()
    timeline = ReceivingGrid(grid, MetricsLog(tmp_path), poll_s=0.01)
    timeline.inbox.node_sites.update({11: "site-1", RETURNS: "site-2", NEVER: "site-3"})
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 2})}), node, MessageType.TRAIN)
        for node in (11, RETURNS, NEVER)
    ]
    replies = list(timeline.send_and_receive(messages, timeout=0.5))
    assert grid.sent_to.count(RETURNS) == 2 and grid.sent_to.count(NEVER) == 1
    answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
    assert answered == {11, RETURNS}
    (failed,) = [r for r in replies if r.has_error()]
    assert failed.error.code == ErrorCode.NODE_UNAVAILABLE and failed.error.reason.startswith("site site-3: ")


def test_a_site_cannot_make_the_centre_resend_by_claiming_it_was_not_reached(tmp_path):
    """An error a site itself sends with the SuperLink's 'node unavailable' code is its failure, not a resend."""

    class Liar(RestartingSites):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for message_id in ids:
                reply = self.replies[message_id]
                if reply.metadata.src_node_id == SUPERLINK_NODE_ID:  # the site itself says it, from its own node
                    reply.metadata.__dict__["_src_node_id"] = reply.metadata.dst_node_id or RETURNS
            return ids

    grid = Liar()
    timeline = ReceivingGrid(grid, MetricsLog(tmp_path), poll_s=0.01)
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 2})}), node, MessageType.TRAIN)
        for node in (11, RETURNS)
    ]
    replies = list(timeline.send_and_receive(messages, timeout=0.5))
    assert grid.sent_to.count(RETURNS) == 1 and sum(r.has_error() for r in replies) == 1
