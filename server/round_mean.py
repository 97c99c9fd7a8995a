r"""The round's mean: the sound training updates of a round combined into one model, or none below the quorum.

The strategy (server/strategy.py) asks its mean step twice a round: ``configure`` the training messages before
they leave, and the mean of the replies given :math:`w^t`. Two steps share that interface:

- ``PlainMean``: the replies screened (server/screening.py), kept by the schedule (server/schedules.py) and
  recorded as trained; under central DP (server/dp.py) each update is clipped and scaled so that the
  unweighted mean over :math:`m` sites is the sum over the federation's size; then combined by
  ``federation.aggregator`` (server/aggregator.py), the sites' metrics by FedAvg's metrics function.
- ``SecureMean``: under ``federation.secure_aggregation``, :math:`w^t` plus the unmasked sum of the survivors'
  clipped updates (server/secure_sum.py, whose key and share exchanges run in ``configure``) over their number,
  or over the federation's size under DP. Every site weighs 1; the centre never holds one update.

Below the schedule's quorum of sound sites neither gives a model: the round is skipped (the model is kept) or
the run stops with ``QuorumNotReached``, as ``federation.on_quorum_failure`` says.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.config import FedsegConfig

from .aggregator import Aggregator
from .dp import CentralDP
from .recorder import RunRecorder
from .schedules import ParallelSchedule
from .screening import ReplyScreen
from .secure_sum import SecureSum

log = logging.getLogger("fedseg.server")

Mean = tuple[ArrayRecord | None, MetricRecord | None, int]
"""The round's mean model (None below quorum), the sites' metrics, and the number of sites it is taken over."""

MetricsAggr = Callable[[list[RecordDict], str], MetricRecord]
"""FedAvg's ``train_metrics_aggr_fn``: the sites' metrics records and the key that weighs them."""


class QuorumNotReached(RuntimeError):
    """Fewer sites than the quorum succeeded and the federation is set to stop."""


@dataclass
class RoundMean(ABC):
    """A round's mean step: ``configure`` the training messages, then the mean of the replies."""

    schedule: ParallelSchedule
    screen: ReplyScreen
    recorder: RunRecorder
    privacy: CentralDP | None
    on_quorum_failure: str

    def configure(self, rnd: int, messages: list[Message], grid: Grid) -> list[Message]:
        """The training messages that leave: all of them (only secure aggregation exchanges keys first)."""
        return messages

    @abstractmethod
    def __call__(self, rnd: int, replies: list[Message], reference: dict[str, np.ndarray] | None) -> Mean:
        """The mean of the round's training replies, given w^t as sent (``reference``); no model below quorum."""

    def _enough(self, rnd: int, sites: int) -> bool:
        """Whether ``sites`` sound updates make the round; below the schedule's quorum the round is skipped
        (the model is kept) or the run stops, as ``federation.on_quorum_failure`` says."""
        if sites >= self.schedule.quorum:
            return True
        self.recorder.below_quorum(rnd, "train", sites, self.on_quorum_failure)
        msg = f"round {rnd}: only {sites} site(s) completed train, quorum is {self.schedule.quorum}"
        if self.on_quorum_failure == "stop":
            raise QuorumNotReached(msg + "; stopping as configured (federation.on_quorum_failure: stop).")
        log.warning("%s; keeping the previous global model", msg)
        return False


def _configured(reference: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """w^t of the round being aggregated (configure_train set it before any update could arrive)."""
    if reference is None:
        raise RuntimeError("no round was configured: configure_train sets the global model first")
    return reference


@dataclass
class PlainMean(RoundMean):
    """The sound updates the schedule keeps, combined by ``federation.aggregator`` (clipped, unweighted under DP)."""

    aggregator: Aggregator
    metrics_aggr: MetricsAggr

    def __call__(self, rnd: int, replies: list[Message], reference: dict[str, np.ndarray] | None) -> Mean:
        reject = self.recorder.rejecter(rnd, "train")
        sound = self.schedule.keep(self.screen.sound(replies, True, reference, reject), reference, reject)
        for msg, site in sound:
            self.recorder.trained(rnd, site, msg)
        updates = [msg for msg, _ in sound]
        if not self._enough(rnd, len(updates)):
            return None, None, len(updates)
        if self.privacy is not None:
            updates = self.privacy.clipped(updates, _configured(reference))
        mean = self.aggregator(updates, reference, equal_weights=self.privacy is not None)
        metrics = [RecordDict({keys.METRICS: msg.content.metric_records[keys.METRICS]}) for msg in updates]
        return mean, self.metrics_aggr(metrics, keys.NUM_EXAMPLES), len(updates)


@dataclass
class SecureMean(RoundMean):
    """w^t plus the unmasked sum of the survivors' updates over their number (the federation's size under DP)."""

    secure_sum: SecureSum

    def configure(self, rnd: int, messages: list[Message], grid: Grid) -> list[Message]:
        """Keys and shares first; only the sites whose shares went round train."""
        return self.secure_sum.configure(rnd, messages, grid)

    def __call__(self, rnd: int, replies: list[Message], reference: dict[str, np.ndarray] | None) -> Mean:
        total, survivors = self.secure_sum.aggregate(rnd, replies)  # (None, []) when the sum is not recovered
        if not self._enough(rnd, len(survivors)) or total is None:
            return None, None, len(survivors)
        denominator = self.privacy.size if self.privacy else len(survivors)
        return (*self.secure_sum.mean(total, survivors, _configured(reference), denominator), len(survivors))


def round_mean(
    cfg: FedsegConfig,
    shapes: dict[str, tuple[int, ...]],
    schedule: ParallelSchedule,
    screen: ReplyScreen,
    recorder: RunRecorder,
    privacy: CentralDP | None,
    metrics_aggr: MetricsAggr,
) -> RoundMean:
    """The mean step ``federation.secure_aggregation`` asks for."""
    parts = (schedule, screen, recorder, privacy, cfg.federation.on_quorum_failure)
    if cfg.federation.secure_aggregation != "none":
        return SecureMean(*parts, SecureSum(cfg, shapes, recorder, screen))
    return PlainMean(*parts, Aggregator(cfg.federation), metrics_aggr)
