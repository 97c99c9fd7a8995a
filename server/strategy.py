"""fedseg's strategy: FedProx over the shared tensors, hardened for hospitals."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from common import keys
from common.config import FedsegConfig
from common.metrics_log import MetricsLog
from common.wire import from_wire, to_wire

from .checkpoints import Checkpoints
from .dp import central_dp
from .recorder import RunRecorder
from .release import Release
from .riding_evaluation import RidingEvaluation
from .round_mean import round_mean
from .schedules import schedule
from .screening import NO_REPLY, ReplyScreen
from .server_opt import server_optimizer
from .validation import ReplyValidator

log = logging.getLogger("fedseg.server")


class FedSegStrategy(FedProx):
    r"""FedProx on the shared tensors; normalization tensors chosen by ``norm_mode`` never leave the site.

    Site k minimises :math:`F_k(w) + \frac{\mu}{2} \lVert w - w^t \rVert^2` (``train.proximal_mu``); the server
    averages the shared tensors of the sites :math:`S_t` whose reply is sound, by training cases:

    .. math::
        w^{t+1} = \sum_{k \in S_t} \frac{n_k}{n} w_k, \qquad n = \sum_{k \in S_t} n_k

    The delta over FedProx: where FedAvg averages in the wire dtype and raises on one inconsistent reply, an
    unsound reply (server/screening.py) is logged and left out, the mean is taken in float32, and below the
    quorum the round is skipped or the run stops. Flower's four hooks compose these parts:

    - the schedule (server/schedules.py): which sites train, all or one in turn (cyclic);
    - the mean (server/round_mean.py): plain or robust (server/aggregator.py), or secure (server/secure_sum.py);
    - central DP (server/dp.py): each update clipped, the mean over the federation's size;
    - the release (server/release.py): the mean noised under DP, stepped by FedAvgM, saved with its state;
    - the recorder (server/recorder.py): the log lines, every round's checkpoint, the best model;
    - evaluation riding with training (server/riding_evaluation.py): one message per site a round.

    A resumed run has done ``round_offset`` rounds before Flower's round 1; ``_round`` maps them, once.
    """

    def __init__(
        self,
        cfg: FedsegConfig,
        signature: str,
        shapes: dict[str, tuple[int, ...]],
        metrics_log: MetricsLog,
        checkpoints: Checkpoints,
        round_offset: int = 0,
    ) -> None:
        fed = cfg.federation
        super().__init__(
            min_train_nodes=fed.min_sites,
            min_evaluate_nodes=fed.min_sites,
            min_available_nodes=fed.min_sites,
            weighted_by_key=keys.NUM_EXAMPLES,
            arrayrecord_key=keys.ARRAYS,
            configrecord_key=keys.CONFIG,
            proximal_mu=cfg.train.proximal_mu,
        )
        self.cfg, self.signature, self.shapes, self.round_offset = cfg, signature, shapes, round_offset
        self.node_sites: dict[int, str] = {}
        self.screen = ReplyScreen(ReplyValidator(signature, shapes, fed.norm_bound), self.node_sites)
        self.recorder = RunRecorder(metrics_log, checkpoints)
        self.schedule = schedule(fed)
        self.riding = RidingEvaluation(
            self.screen, self.recorder, round_offset + 1, fed.rounds, self.schedule.offer_best
        )
        self.privacy = central_dp(cfg, metrics_log, round_offset)
        self.round_mean = round_mean(
            cfg, shapes, self.schedule, self.screen, self.recorder, self.privacy, self.train_metrics_aggr_fn
        )
        self.release = Release(self.privacy, server_optimizer(fed), self.recorder, shapes)
        self.reference: dict[str, np.ndarray] | None = None
        """w^t, the global tensors as sent for training this round: the origin of every site's update."""

    def summary(self) -> None:
        fed = self.cfg.federation
        log.info(
            "fedseg: norm_mode=%s schedule=%s quorum=%d on_quorum_failure=%s aggregator=%s secure_aggregation=%s "
            "central_dp=%s server_optimizer=%s wire=%s",
            *(self.cfg.train.norm_mode, fed.schedule, self.schedule.quorum, fed.on_quorum_failure, fed.aggregator),
            *(fed.secure_aggregation, self.privacy is not None, fed.server_optimizer, fed.wire_dtype),
        )
        super().summary()

    def _round(self, server_round: int) -> int:
        """The run's round of Flower's ``server_round``."""
        return server_round + self.round_offset

    def _wire(self, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """The global model in the wire dtype; ``config`` carries the dtype and the model signature."""
        config[keys.SIGNATURE] = self.signature
        config[keys.WIRE_DTYPE] = self.cfg.federation.wire_dtype
        return to_wire(from_wire(arrays), self.cfg.federation.wire_dtype)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._round(server_round)
        self.recorder.start_round(rnd)
        config[keys.EVALUATE_RECEIVED] = self.riding.asked(rnd)
        wire = self._wire(arrays, config)
        messages = self.screen.outgoing = list(super().configure_train(rnd, wire, config, grid))
        messages = self.screen.outgoing = self.schedule.select(rnd, messages)
        messages = self.screen.outgoing = self.round_mean.configure(rnd, messages, grid)
        self.reference = {k: v.numpy().astype(np.float32) for k, v in wire.items()}
        self.schedule.start_round(arrays, self.reference)
        self.recorder.sent(rnd, wire, len(messages), training=True)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The last round's evaluation; every earlier one rides with the next round's training."""
        rnd = self._round(server_round)
        if not self.riding.own_step(rnd):
            return []
        wire = self._wire(arrays, config)
        messages = self.screen.outgoing = list(super().configure_evaluate(rnd, wire, config, grid))
        messages = self.riding.recipients(messages)
        self.recorder.sent(rnd, wire, len(messages), training=False)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen and combine the round's updates (securely, privately), step and publish the new model."""
        rnd = self._round(server_round)
        replies = list(replies)
        for site in self.screen.silent(replies):
            self.recorder.rejected(rnd, site, "train", NO_REPLY.format(self.cfg.federation.round_timeout_s))
        self.riding.close_previous(rnd, replies)
        with self.recorder.timed(rnd):
            mean, metrics, sites = self.round_mean(rnd, replies, self.reference)
        model = self.schedule.fallback(rnd, replies) if mean is None else self.release(rnd, mean, sites, self.reference)
        if model is not None:
            self.release.save(rnd, model)
        return model, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.riding.evaluate(self._round(server_round), replies)
