r"""Evaluation riding with training: one message per site and round instead of two.

From this server's second round on, the training message asks each site to
score the model it carries, :math:`w^t` with the site's own norm tensors,
before training on it (``keys.EVALUATE_RECEIVED``). That is exactly what a
separate evaluation of round t would have scored, so round t's Dice and
best-model choice are unchanged; they are recorded when round t + 1's replies
arrive (``close_previous``), and only the run's last round sends an evaluation
message of its own (``own_step``, ``evaluate``). A site that said it has too
few validation cases to score is not asked for a score.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, MetricRecord

from common import keys

from .recorder import RunRecorder
from .screening import ReplyScreen


def reports_no_score(msg: Message) -> bool:
    """Whether a training reply says its site has too few validation cases to score (keys.NO_SCORE). Never raises."""
    try:
        return not msg.has_error() and msg.content.metric_records[keys.METRICS].get(keys.NO_SCORE) == 1
    except Exception:  # a malformed reply is the validator's to report
        return False


@dataclass(frozen=True)
class RidingEvaluation:
    """Records the evaluations training replies carry, and the last round's own evaluation."""

    screen: ReplyScreen
    recorder: RunRecorder
    first_round: int
    """This server's first round: the model it trains on was closed by an earlier server, or is w^0."""
    last_round: int
    offer_best: bool
    """Whether a round closed with carried evaluations may become the best model (the schedule's say)."""

    def asked(self, rnd: int) -> bool:
        """Whether round ``rnd``'s training messages ask the sites to score the model they carry."""
        return rnd > self.first_round

    def close_previous(self, rnd: int, replies: list[Message]) -> None:
        """Record the evaluations of round ``rnd - 1``'s model that came with round ``rnd``'s training, and
        close round ``rnd - 1``."""
        if not self.asked(rnd):
            return
        for msg, site, problem in self.screen.received(replies):
            if problem is not None and reports_no_score(msg):
                self.recorder.no_score(rnd - 1, site)
            elif problem is None:
                self.recorder.evaluated(rnd - 1, site, msg.content.metric_records[keys.EVALUATION])
            else:
                self.recorder.rejected(rnd - 1, site, "evaluate", problem)
        self.recorder.close_round(rnd - 1, offer_best=self.offer_best)

    def own_step(self, rnd: int) -> bool:
        """Whether round ``rnd`` sends evaluation messages of its own: the run's last round only."""
        return rnd >= self.last_round

    def recipients(self, messages: list[Message]) -> list[Message]:
        """The evaluation messages to send: none to a site that said it sends no score."""
        return [m for m in messages if self.screen.node_sites.get(m.metadata.dst_node_id) not in self.recorder.unscored]

    def evaluate(self, rnd: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the last round's evaluations and close it; its Dice, or None without a sound evaluation."""
        if not self.own_step(rnd):
            return None
        sound = self.screen.sound(replies, False, None, self.recorder.rejecter(rnd, "evaluate"))
        for msg, site in sound:
            self.recorder.evaluated(rnd, site, msg.content.metric_records[keys.METRICS])
        summary = self.recorder.close_round(rnd)
        return MetricRecord(dict(summary)) if sound else None
