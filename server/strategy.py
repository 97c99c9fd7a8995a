"""fedseg's strategy: FedProx over the shared tensors, hardened for hospitals."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common import keys
from common.config import FedsegConfig
from common.digest import message_sha256
from common.metrics_log import MetricsLog
from common.wire import from_wire, named_site, to_wire

from . import robust
from .checkpoints import Checkpoints
from .server_opt import server_optimizer
from .site_registry import claim_problem, site_name
from .validation import ReplyValidator

log = logging.getLogger("fedseg.server")


class QuorumNotReached(RuntimeError):
    """Fewer sites than the quorum succeeded and the federation is set to stop."""


@dataclass
class RoundTally:
    """What happened in one round, for its summary line."""

    started: float = field(default_factory=time.perf_counter)
    bytes_total: int = 0
    bytes_down: int = 0
    """Bytes of the global model sent to each site for training."""
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    aggregated: bool = False
    reference: dict[str, np.ndarray] | None = None
    """The global tensors as sent this round: the origin of every site's update."""
    screened: bool = False
    """The replies about to be aggregated were already screened (the DP wrapper screens before it clips)."""
    aggregation_s: float = 0.0


def _annotator_fields(metrics: MetricRecord) -> dict[str, object]:
    """Dice against the fusion and against each annotator, for sites whose cases have several label files."""
    per_annotator = [float(metrics[k]) for k in keys.ANNOTATOR_METRICS[1:] if k in metrics]
    if not per_annotator:
        return {}
    return {"dice_fusion": float(metrics[keys.ANNOTATOR_METRICS[0]]), "dice_per_annotator": per_annotator}


class FedSegStrategy(FedProx):
    r"""FedProx on the shared tensors; normalization tensors chosen by ``norm_mode`` never leave the site.

    Site k minimises its local objective with the proximal term

    .. math::
        F_k(w) + \frac{\mu}{2} \lVert w - w^t \rVert^2

    over the shared trainable parameters, and the server averages the shared
    tensors weighted by the sites' training cases (``federation.aggregator: mean``):

    .. math::
        w^{t+1} = \sum_{k \in S_t} \frac{n_k}{n} w_k, \qquad n = \sum_{k \in S_t} n_k

    where :math:`S_t` are the sites whose reply passed validation (signature,
    keys, shapes, finite values, and an update no larger than ``norm_bound``
    times the median of the other sites':
    :math:`\lVert w_k - w^t \rVert \le c \cdot \mathrm{median}_{j \ne k} \lVert w_j - w^t \rVert`).
    Replies that fail are logged and left out, so
    one broken site can neither end the run nor poison the average. The
    ``trimmed_mean`` and ``median`` aggregators replace the weighted mean by the
    unweighted coordinate-wise trimmed mean or median over :math:`S_t`
    (server/robust.py). With differential privacy on, every :math:`w_k - w^t`
    is clipped to norm :math:`C`, the clipped updates are summed over :math:`S_t`
    and divided by the federation's fixed size :math:`n`, and Gaussian noise of
    std :math:`zC/n` is added (server/dp.py). When fewer
    than ``federation.min_sites`` sites remain, the round is not aggregated:
    it is skipped (the previous global model is kept) or the run stops, as
    configured. With ``federation.server_optimizer`` the server moves by Flower's
    FedAdam or FedYogi step on :math:`w_{agg} - w^t` instead (server/server_opt.py).
    Arrays may travel in float16; the mean is always taken in float32.
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
        quorum = cfg.federation.min_sites
        super().__init__(
            min_train_nodes=quorum,
            min_evaluate_nodes=quorum,
            min_available_nodes=quorum,
            weighted_by_key=keys.NUM_EXAMPLES,
            arrayrecord_key=keys.ARRAYS,
            configrecord_key=keys.CONFIG,
            proximal_mu=cfg.train.proximal_mu,
        )
        self.cfg = cfg
        self.signature = signature
        self.shapes = shapes
        self.metrics = metrics_log
        self.checkpoints = checkpoints
        self.round_offset = round_offset
        self.node_sites: dict[int, str] = {}
        self.outgoing: list[Message] = []
        """The last configure step's messages: names the node behind an error the SuperLink wrote."""
        self.tally = RoundTally()
        self.validator = ReplyValidator(signature, shapes, cfg.federation.norm_bound)
        self.server_optimizer = server_optimizer(cfg.federation)
        self.private = cfg.privacy.noise_multiplier > 0
        """With DP the mean is unweighted and the DP wrapper publishes the noised model (server/dp.py)."""

    def summary(self) -> None:
        log.info("fedseg: norm_mode=%s quorum=%d on_quorum_failure=%s wire=%s",
                 self.cfg.train.norm_mode, self.cfg.federation.min_sites,
                 self.cfg.federation.on_quorum_failure, self.cfg.federation.wire_dtype)
        super().summary()

    # --- configure -----------------------------------------------------------------

    def _outgoing(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> tuple[int, ArrayRecord]:
        config[keys.SIGNATURE] = self.signature
        config[keys.WIRE_DTYPE] = self.cfg.federation.wire_dtype
        wire = to_wire(from_wire(arrays), self.cfg.federation.wire_dtype)
        return server_round + self.round_offset, wire

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.tally = RoundTally()
        rnd, wire = self._outgoing(server_round, arrays, config)
        messages = self.outgoing = list(super().configure_train(rnd, wire, config, grid))
        self.tally.reference = {k: v.numpy().astype(np.float32) for k, v in wire.items()}
        self.tally.bytes_down = wire.count_bytes()
        self.tally.bytes_total += wire.count_bytes() * len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd, wire = self._outgoing(server_round, arrays, config)
        messages = self.outgoing = list(super().configure_evaluate(rnd, wire, config, grid))
        self.tally.bytes_total += wire.count_bytes() * len(messages)
        return messages

    # --- screening -------------------------------------------------------------------

    def _site(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:  # the SuperLink answered for a node that went away
            node = next((m.metadata.dst_node_id for m in self.outgoing
                         if m.metadata.message_id == msg.metadata.reply_to_message_id), node)
        return site_name(self.node_sites, node, named_site(msg))

    def _problem(self, msg: Message, is_train: bool) -> str | None:
        """The validator's verdict, or a reply that names another site than the node it came from."""
        problem = self.validator.problem(msg, is_train)
        if problem is None and not msg.has_error():
            return claim_problem(self.node_sites, msg.metadata.src_node_id, named_site(msg))
        return problem

    def _screen(self, server_round: int, replies: Iterable[Message], is_train: bool) -> list[Message]:
        """Keep sound replies (server/validation.py); log every failure with the site and reason."""
        checked = [(msg, self._problem(msg, is_train)) for msg in replies]
        if is_train and self.tally.reference is not None:
            sound = [msg for msg, problem in checked if problem is None]
            updates = [msg.content.array_records[keys.ARRAYS] for msg in sound]
            too_large = iter(self.validator.norm_problems(updates, self.tally.reference))
            checked = [(msg, problem if problem is not None else next(too_large)) for msg, problem in checked]
        sound = []
        for msg, problem in checked:
            site = self._site(msg)
            if problem is None:
                sound.append(msg)
                continue
            stage = "train" if is_train else "evaluate"
            log.warning("round %d: %s reply of site %s rejected: %s", server_round, stage, site, problem)
            self.metrics.write("failure", round=server_round, site=site, stage=stage, reason=problem)
            if site not in self.tally.failed:
                self.tally.failed.append(site)
        return sound

    def _below_quorum(self, server_round: int, stage: str, n_ok: int) -> None:
        msg = (f"round {server_round}: only {n_ok} site(s) completed {stage}, "
               f"quorum is {self.cfg.federation.min_sites}")
        self.metrics.write("quorum-failure", round=server_round, stage=stage, sites_ok=n_ok,
                           action=self.cfg.federation.on_quorum_failure)
        self.metrics.sync()
        if self.cfg.federation.on_quorum_failure == "stop":
            raise QuorumNotReached(msg + "; stopping as configured (federation.on_quorum_failure: stop).")
        log.warning("%s; keeping the previous global model", msg)

    # --- aggregate -------------------------------------------------------------------

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The sound training replies of a round, each logged with the digest of what arrived."""
        started = time.perf_counter()
        rnd = server_round + self.round_offset
        sound = self._screen(rnd, replies, is_train=True)
        for msg in sound:
            metrics = msg.content.metric_records[keys.METRICS]
            arrays = msg.content.array_records[keys.ARRAYS]
            site = self._site(msg)
            self.tally.trained.append(site)
            self.tally.bytes_total += arrays.count_bytes()
            self.metrics.write(
                "train", round=rnd, site=site, num_examples=int(metrics[keys.NUM_EXAMPLES]),
                loss=metrics["loss"], proximal_loss=metrics["proximal_loss"],
                duration_s=metrics["duration_s"], bytes_up=arrays.count_bytes(),
                bytes_down=self.tally.bytes_down, **{keys.CONTENT_SHA256: message_sha256(msg)},
            )
        self.tally.screened = True
        self.tally.aggregation_s += time.perf_counter() - started
        return sound

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        sound = list(replies) if self.tally.screened else self.screen_train(server_round, replies)
        self.tally.screened = False
        if len(sound) < self.cfg.federation.min_sites:
            self._below_quorum(rnd, "train", len(sound))
            return None, None
        started = time.perf_counter()
        metrics = [RecordDict({keys.METRICS: msg.content.metric_records[keys.METRICS]}) for msg in sound]
        weights = [1.0 if self.private else float(m[keys.METRICS][keys.NUM_EXAMPLES]) for m in metrics]
        aggregate = robust.aggregate([msg.content.array_records[keys.ARRAYS] for msg in sound], weights,
                                     self.cfg.federation, self.tally.reference)
        if self.server_optimizer is not None and self.tally.reference is not None:
            aggregate = self.server_optimizer.step(rnd, self.tally.reference, aggregate)
        self.tally.aggregation_s += time.perf_counter() - started
        if not self.private:
            self.publish(rnd, aggregate)
        return aggregate, aggregate_metricrecords(metrics, keys.NUM_EXAMPLES)

    def publish(self, rnd: int, aggregate: ArrayRecord) -> None:
        """Make ``aggregate`` the round's global model on disk (with DP: the noised one)."""
        self.checkpoints.save_round(rnd, from_wire(aggregate))
        self.tally.aggregated = True

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        sound = self._screen(rnd, replies, is_train=False)
        dice, weights = [], []
        for msg in sound:
            m = msg.content.metric_records[keys.METRICS]
            per_class = [float(v) for k, v in sorted(m.items()) if k.startswith(keys.DICE_CLASS_PREFIX)]
            self.metrics.write(
                "evaluate", round=rnd, site=self._site(msg), num_examples=int(m[keys.NUM_EXAMPLES]),
                dice=m["dice"], dice_per_class=per_class, hd95=m.get("hd95"), loss=m["loss"],
                **_annotator_fields(m),
            )
            dice.append(float(m["dice"]))
            weights.append(float(m[keys.NUM_EXAMPLES]))
        summary = self._close_round(rnd, dice, weights)
        if not sound:
            return None
        return MetricRecord({"dice_mean": summary["dice_mean"], "dice_weighted": summary["dice_weighted"]})

    def _close_round(self, rnd: int, dice: list[float], weights: list[float]) -> dict:
        """Write the round's summary, offer the model as best, and make the log durable."""
        dice_mean = float(np.mean(dice)) if dice else float("nan")
        dice_weighted = float(np.average(dice, weights=weights)) if dice else float("nan")
        summary = self.metrics.write(
            "round", round=rnd, sites_ok=len(self.tally.trained), sites_failed=self.tally.failed,
            aggregated=self.tally.aggregated, dice_mean=dice_mean, dice_weighted=dice_weighted,
            duration_s=time.perf_counter() - self.tally.started, bytes_total=self.tally.bytes_total,
            aggregation_s=self.tally.aggregation_s,
        )
        if self.tally.aggregated and dice:
            self.checkpoints.offer_best(rnd, dice_weighted)
        self.metrics.sync()
        log.info("round %d: %d site(s) trained, %d failed, Dice mean %.4f weighted %.4f",
                 rnd, len(self.tally.trained), len(self.tally.failed), dice_mean, dice_weighted)
        return {"dice_mean": dice_mean, "dice_weighted": dice_weighted}
