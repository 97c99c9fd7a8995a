r"""Which sites train in a round, and what the round needs of them: every site (parallel) or one in turn (cyclic).

The strategy (server/strategy.py, its mean in server/round_mean.py) asks its schedule at four points of a round:
``select`` the training messages, ``start_round`` with the model sent,
``keep`` the sound replies it may use, and ``fallback`` when it has none.
``ParallelSchedule`` is the trivial one: every connected training site trains,
``federation.min_sites`` sound updates make a round, and any round may become
the best model.

``CyclicSchedule`` is cyclical weight transfer (Chang et al. 2018): round t
trains only the site whose turn it is, :math:`k_t = t \bmod K` over the K
connected training sites in node-id order, so :math:`w^{t+1} = w_{k_t}`.
With one reply a round there is no median of other sites to bound an update
by, so it is bounded by the model:
:math:`\lVert w_{k_t} - w^t \rVert \le c \cdot \max(\lVert w^t \rVert, \lVert w^0 \rVert)`
(``federation.norm_bound`` :math:`c`; :math:`w^0` the run's first model, so a
site that shrinks the model cannot shrink the bound). The next site is the
first to train on :math:`w_{k_t}`, so a round whose site replied but could not
be used goes back to the last model a site did train on, and the turn moves
on: one update no site can train on cannot stall the cycle. The Dice of
different sites is no ranking, so only the last round, which every site
scores, is offered as the best model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Message

from common import keys
from common.config import FederationConfig
from common.flower.constants import SUPERLINK_NODE_ID

from .validation import model_norm, update_norm

log = logging.getLogger("fedseg.server")

Reject = Callable[[str, str], None]
"""Logs a site's training reply as rejected, with the reason: (site, reason)."""


class ParallelSchedule:
    """Every connected training site trains each round; the round needs ``quorum`` sound updates."""

    offer_best = True
    """Whether each round's model may become the best one by the sites' Dice."""

    def __init__(self, quorum: int) -> None:
        self.quorum = quorum

    def select(self, rnd: int, messages: list[Message]) -> list[Message]:
        """The training messages that go out in round ``rnd``."""
        return messages

    def start_round(self, sent: ArrayRecord, reference: dict[str, np.ndarray]) -> None:
        """The round's model, as received (``sent``) and in float32 as it travels (``reference``)."""

    def keep(
        self, sound: list[tuple[Message, str]], reference: dict[str, np.ndarray] | None, reject: Reject
    ) -> list[tuple[Message, str]]:
        """The sound replies the round may aggregate."""
        return sound

    def fallback(self, rnd: int, replies: list[Message]) -> ArrayRecord | None:
        """The model a round without an aggregate moves to; None keeps the model."""
        return None


class CyclicSchedule(ParallelSchedule):
    """One training site per round, in turn; its weights become the model (see the module's docstring)."""

    offer_best = False

    def __init__(self, norm_bound: float) -> None:
        super().__init__(quorum=1)
        self.norm_bound = norm_bound
        self.sent: ArrayRecord | None = None
        self.first_norm: float | None = None
        """||w^0||, the run's first model: a floor under the model norm that bounds an update."""
        self.trained_on: ArrayRecord | None = None
        """The last model a site trained on soundly, which a stalled round goes back to."""

    def select(self, rnd: int, messages: list[Message]) -> list[Message]:
        """The message of the site whose turn round ``rnd`` is, the sites taken in node-id order."""
        if not messages:
            return messages
        ordered = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        return [ordered[(rnd - 1) % len(ordered)]]

    def start_round(self, sent: ArrayRecord, reference: dict[str, np.ndarray]) -> None:
        self.sent = sent
        if self.first_norm is None:
            self.first_norm = model_norm(reference)

    def keep(
        self, sound: list[tuple[Message, str]], reference: dict[str, np.ndarray] | None, reject: Reject
    ) -> list[tuple[Message, str]]:
        """The update in turn if it is within ``norm_bound`` times the model's norm (or w^0's, if larger); one
        that is not is the site's failure, since its weights would become the model."""
        kept = [(msg, site) for msg, site in sound if self._fits(msg, site, reference, reject)]
        if kept:
            self.trained_on = self.sent
        return kept

    def _fits(self, msg: Message, site: str, reference: dict[str, np.ndarray] | None, reject: Reject) -> bool:
        if self.norm_bound <= 0 or reference is None:
            return True
        scale = max(model_norm(reference), self.first_norm or 0.0)
        norm = update_norm(msg.content.array_records[keys.ARRAYS], reference)
        if norm <= self.norm_bound * scale:
            return True
        reject(
            site, f"update norm {norm:.4g} exceeds {self.norm_bound:g} x the model's norm {scale:.4g} (cyclic schedule)"
        )
        return False

    def fallback(self, rnd: int, replies: list[Message]) -> ArrayRecord | None:
        """The last model a site trained on, when the site in turn replied but its reply could not be used.

        The model it got, w_k of the site before it, was never trained on: it is the suspect, and keeping it
        would fail every later site the same way. None (keep the model) when the site did not reply itself (no
        reply, or the SuperLink's word that its node went away), or the model sent is already that one.
        """
        from_site = [m for m in replies if m.metadata.src_node_id != SUPERLINK_NODE_ID]
        if not from_site or self.trained_on is None or self.trained_on is self.sent:
            return None
        log.warning(
            "round %d: the site in turn could not train on the model it got; going back to the last "
            "model a site trained on, and on to the next site",
            rnd,
        )
        return self.trained_on


def schedule(cfg: FederationConfig) -> ParallelSchedule:
    """The schedule ``federation.schedule`` names."""
    return CyclicSchedule(cfg.norm_bound) if cfg.schedule == "cyclic" else ParallelSchedule(cfg.min_sites)
