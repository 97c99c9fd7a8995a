"""fedseg's strategy: FedProx over the shared tensors, hardened for hospitals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx

from common import keys
from common.config import FedsegConfig
from common.metrics_log import MetricsLog
from common.wire import from_wire, to_wire

from .aggregator import Aggregator
from .checkpoints import Checkpoints
from .dp import central_dp
from .recorder import RunRecorder
from .riding_evaluation import RidingEvaluation
from .schedules import schedule
from .screening import ReplyScreen
from .secure_sum import SecureSum
from .server_opt import server_optimizer
from .validation import ReplyValidator

log = logging.getLogger("fedseg.server")


class QuorumNotReached(RuntimeError):
    """Fewer sites than the quorum succeeded and the federation is set to stop."""


class FedSegStrategy(FedProx):
    r"""FedProx on the shared tensors; normalization tensors chosen by ``norm_mode`` never leave the site.

    Site k minimises :math:`F_k(w) + \frac{\mu}{2} \lVert w - w^t \rVert^2` (FedProx,
    ``train.proximal_mu``). The server keeps the sites :math:`S_t` whose reply is sound
    (server/screening.py: signature, keys, shapes, finite values, the site's own name, and
    :math:`\lVert w_k - w^t \rVert \le c \cdot \mathrm{median}_{j \ne k} \lVert w_j - w^t \rVert`
    with :math:`c` = ``norm_bound``) and averages their shared tensors by training cases:

    .. math::
        w^{t+1} = \sum_{k \in S_t} \frac{n_k}{n} w_k, \qquad n = \sum_{k \in S_t} n_k

    The delta over FedProx: FedAvg would average in the wire dtype (float16 may travel) and raise
    on one inconsistent reply, so ``aggregate_train`` screens instead (a bad reply is logged and
    left out) and combines in float32. Below ``federation.min_sites`` sound sites the round is
    skipped (the model is kept) or the run stops. A round is made of parts:

    - the schedule (server/schedules.py) picks the sites that train: all, or one in turn (cyclic);
    - the mean: ``federation.aggregator`` (server/aggregator.py: the weighted mean above, or a
      robust one), or under ``federation.secure_aggregation`` the unmasked mean of the sites'
      clipped updates (server/secure_sum.py: its key and share exchanges run before the training
      messages leave; every site weighs 1; the centre never holds one update);
    - central DP (server/dp.py), when on: each update clipped, the mean taken over the federation's
      fixed size, then noised;
    - the server optimizer (server/server_opt.py): FedAvgM's step on the (noised) mean;
    - the recorder (server/recorder.py) writes the log lines, checkpoints and best model, and
      evaluation rides with training (server/riding_evaluation.py): one message per site a round.

    Flower counts a server's rounds from 1; a resumed run has completed ``round_offset`` rounds
    before it, and every part of fedseg counts the run's rounds (``_round``).
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
        self.aggregator = Aggregator(fed)
        self.secure_sum = (
            SecureSum(cfg, shapes, self.recorder, self.screen) if fed.secure_aggregation != "none" else None
        )
        self.privacy = central_dp(cfg, metrics_log, round_offset)
        self.optimizer = server_optimizer(fed)
        self.reference: dict[str, np.ndarray] | None = None
        """w^t, the global tensors as sent for training this round: the origin of every site's update."""

    def summary(self) -> None:
        fed = self.cfg.federation
        log.info(
            "fedseg: norm_mode=%s schedule=%s quorum=%d on_quorum_failure=%s aggregator=%s secure_aggregation=%s "
            "central_dp=%s server_optimizer=%s wire=%s",
            self.cfg.train.norm_mode,
            fed.schedule,
            self.schedule.quorum,
            fed.on_quorum_failure,
            fed.aggregator,
            fed.secure_aggregation,
            self.privacy is not None,
            fed.server_optimizer,
            fed.wire_dtype,
        )
        super().summary()

    def _round(self, server_round: int) -> int:
        """The run's round of Flower's ``server_round``."""
        return server_round + self.round_offset

    def _messages(
        self,
        configure: Callable[..., Iterable[Message]],
        rnd: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
    ) -> tuple[list[Message], ArrayRecord]:
        """FedProx's messages, carrying the global model in the wire dtype and the model signature."""
        config[keys.SIGNATURE] = self.signature
        config[keys.WIRE_DTYPE] = self.cfg.federation.wire_dtype
        wire = to_wire(from_wire(arrays), self.cfg.federation.wire_dtype)
        self.screen.outgoing = list(configure(rnd, wire, config, grid))
        return self.screen.outgoing, wire

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._round(server_round)
        self.recorder.start_round(rnd)
        config[keys.EVALUATE_RECEIVED] = self.riding.asked(rnd)
        messages, wire = self._messages(super().configure_train, rnd, arrays, config, grid)
        messages = self.screen.outgoing = self.schedule.select(rnd, messages)
        if self.secure_sum is not None:  # keys and shares first; only the sites whose shares went round train
            messages = self.screen.outgoing = self.secure_sum.configure(rnd, messages, grid)
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
        messages, wire = self._messages(super().configure_evaluate, rnd, arrays, config, grid)
        messages = self.riding.recipients(messages)
        self.recorder.sent(rnd, wire, len(messages), training=False)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen and combine the round's updates (securely, privately), step and publish the new model."""
        rnd = self._round(server_round)
        replies = list(replies)
        self.riding.close_previous(rnd, replies)
        with self.recorder.timed(rnd):
            if self.secure_sum is not None:
                mean, metrics, sites = self._secure_mean(self.secure_sum, rnd, replies)
            else:
                mean, metrics, sites = self._mean(rnd, replies)
        if mean is None:
            model = self.schedule.fallback(rnd, replies)
        else:
            model = self.privacy.release(rnd, mean, sites) if self.privacy else mean
            if self.optimizer is not None and self.reference is not None:  # post-processing of the release
                model = self.optimizer.step(self.reference, model)
        if model is not None:
            if self.optimizer is not None:  # its state beside the round's model, for a resume from it
                self.optimizer.save(self.recorder.checkpoints, rnd)
            self.recorder.saved(rnd, model)
        return model, metrics

    def _mean(self, rnd: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None, int]:
        """The sound updates the schedule keeps, combined (clipped and unweighted under DP); None below quorum."""
        reject = self.recorder.rejecter(rnd, "train")
        sound = self.schedule.keep(self.screen.sound(replies, True, self.reference, reject), self.reference, reject)
        for msg, site in sound:
            self.recorder.trained(rnd, site, msg)
        updates = [msg for msg, _ in sound]
        if not self._enough(rnd, len(updates)):
            return None, None, len(updates)
        if self.privacy is not None:
            updates = self.privacy.clipped(updates, self._round_reference())
        mean = self.aggregator(updates, self.reference, equal_weights=self.privacy is not None)
        metrics = [RecordDict({keys.METRICS: msg.content.metric_records[keys.METRICS]}) for msg in updates]
        return mean, self.train_metrics_aggr_fn(metrics, self.weighted_by_key), len(updates)

    def _secure_mean(
        self, secure_sum: SecureSum, rnd: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None, int]:
        """w^t plus the unmasked sum of the survivors' updates over their number (over the federation's size
        under DP); None below quorum."""
        total, survivors = secure_sum.aggregate(rnd, replies)  # (None, []) when the sum is not recovered
        if not self._enough(rnd, len(survivors)) or total is None:
            return None, None, len(survivors)
        denominator = self.privacy.size if self.privacy else len(survivors)
        return (*secure_sum.mean(total, survivors, self._round_reference(), denominator), len(survivors))

    def _round_reference(self) -> dict[str, np.ndarray]:
        """w^t of the round being aggregated (configure_train set it before any update could arrive)."""
        if self.reference is None:
            raise RuntimeError("no round was configured: configure_train sets the global model first")
        return self.reference

    def _enough(self, rnd: int, sites: int) -> bool:
        """Whether ``sites`` sound updates make the round; below the schedule's quorum the round is skipped
        (the model is kept) or the run stops, as ``federation.on_quorum_failure`` says."""
        if sites >= self.schedule.quorum:
            return True
        action = self.cfg.federation.on_quorum_failure
        self.recorder.below_quorum(rnd, "train", sites, action)
        msg = f"round {rnd}: only {sites} site(s) completed train, quorum is {self.schedule.quorum}"
        if action == "stop":
            raise QuorumNotReached(msg + "; stopping as configured (federation.on_quorum_failure: stop).")
        log.warning("%s; keeping the previous global model", msg)
        return False

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.riding.evaluate(self._round(server_round), replies)

    def resume_optimizer(self, from_round: int) -> None:
        """Continue the server optimizer with its state saved after ``from_round`` (the round whose model the
        run resumes from)."""
        if self.optimizer is not None and from_round > 0:
            self.optimizer.restore(self.recorder.checkpoints, from_round, self.shapes)
