"""Which replies of a round the server may use, and which site sent each.

A reply is judged first on its own (server/validation.py: error, signature,
metrics, keys, shapes, finite values), then on its name (server/site_registry.py:
it must not claim another site's), and a training reply last on the size of
its update among the round's other sound ones. A reply that the SuperLink
wrote for a node that went away carries the SuperLink's id; its site is found
from the message it answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message

from common import keys
from common.flower.constants import SUPERLINK_NODE_ID
from common.wire import named_site

from .site_registry import claim_problem, site_name
from .validation import ReplyValidator

NO_REPLY = (
    "no reply within federation.round_timeout_s ({:g} s): the site is down, cut off or too slow; its "
    "site.log and supernode.log say which"
)
"""The failure of a site whose message was not answered by the round's deadline."""


class ReplyScreen:
    """The validator plus the node -> site names it judges claims against."""

    def __init__(self, validator: ReplyValidator, node_sites: dict[int, str]) -> None:
        self.validator = validator
        self.node_sites = node_sites
        self.outgoing: list[Message] = []
        """The last configure step's messages: they name the node behind an error the SuperLink wrote."""

    def node(self, msg: Message) -> int:
        """The node behind a reply: its sender, or for an error the SuperLink wrote, the node the message went to."""
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID:
            return msg.metadata.src_node_id
        answered = (m for m in self.outgoing if m.metadata.message_id == msg.metadata.reply_to_message_id)
        return next((m.metadata.dst_node_id for m in answered), SUPERLINK_NODE_ID)

    def site(self, msg: Message) -> str:
        return site_name(self.node_sites, self.node(msg), named_site(msg))

    def silent(self, replies: list[Message]) -> list[str]:
        """The sites of the last configure step's messages that sent nothing back before the deadline.

        Without this a site that went quiet (a crash, a cut link, a frozen machine) is missing from the
        round's failures: Flower hands over the replies that came and says nothing of the others. Judged by
        node, before any reply's claimed name is bound to its node.
        """
        answered = {self.node(msg) for msg in replies} | {msg.metadata.src_node_id for msg in replies}
        return [
            site_name(self.node_sites, m.metadata.dst_node_id, None)
            for m in self.outgoing
            if m.metadata.dst_node_id not in answered
        ]

    def _problem(self, msg: Message, is_train: bool) -> str | None:
        """The validator's verdict, or a reply that names another site than the node it came from."""
        problem = self.validator.problem(msg, is_train)
        if problem is None and not msg.has_error():
            return claim_problem(self.node_sites, msg.metadata.src_node_id, named_site(msg))
        return problem

    def claim_checked(self, msg: Message, problem: Callable[[Message], str | None]) -> str | None:
        """``problem``'s verdict on a reply (server/validation.py), or that it names another site than its node."""
        reason = problem(msg)
        if reason is None and not msg.has_error():
            return claim_problem(self.node_sites, msg.metadata.src_node_id, named_site(msg))
        return reason

    def received(self, replies: Iterable[Message]) -> list[tuple[Message, str, str | None]]:
        """Each training reply that is not an error, with its site and why the evaluation it carries of the
        received model cannot be used (None: sound). An error reply is the training step's failure alone."""
        found = []
        for msg in replies:
            if msg.has_error():
                continue
            problem = self.validator.received_problem(msg)
            if problem is None:
                problem = claim_problem(self.node_sites, msg.metadata.src_node_id, named_site(msg))
            found.append((msg, self.site(msg), problem))
        return found

    def verdicts(
        self, replies: Iterable[Message], is_train: bool, reference: dict[str, np.ndarray] | None
    ) -> list[tuple[Message, str, str | None]]:
        """Each reply with its site and why it cannot be used (None: sound).

        ``reference`` is the round's global model w^t; without it (evaluation) update sizes are not compared.
        """
        replies = list(replies)
        problems = [self._problem(msg, is_train) for msg in replies]
        if is_train and reference is not None:
            sound = [
                msg.content.array_records[keys.ARRAYS] for msg, p in zip(replies, problems, strict=True) if p is None
            ]
            too_large = iter(self.validator.norm_problems(sound, reference))
            problems = [next(too_large) if p is None else p for p in problems]
        return [(msg, self.site(msg), problem) for msg, problem in zip(replies, problems, strict=True)]

    def sound(
        self,
        replies: Iterable[Message],
        is_train: bool,
        reference: dict[str, np.ndarray] | None,
        reject: Callable[[str, str], None],
    ) -> list[tuple[Message, str]]:
        """The sound replies with their sites; every other one goes to ``reject(site, reason)``."""
        kept = []
        for msg, site, problem in self.verdicts(replies, is_train, reference):
            if problem is None:
                kept.append((msg, site))
            else:
                reject(site, problem)
        return kept
