"""Flower 1.42's internal constants fedseg reads: who wrote a message, why it failed, a run's and a node's state."""

from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode, Status
from flwr.supercore.constant import NodeStatus

__all__ = ["SUPERLINK_NODE_ID", "ErrorCode", "NodeStatus", "Status", "UNDELIVERED"]

UNDELIVERED = frozenset(
    {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
)
"""The SuperLink's answers for a message that never reached its node, or whose reply was lost."""
