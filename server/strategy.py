"""fedseg's strategy: FedProx over the shared tensors, hardened for hospitals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx
from safetensors import SafetensorError

from common import keys
from common.config import FedsegConfig
from common.flower.constants import SUPERLINK_NODE_ID
from common.metrics_log import MetricsLog
from common.wire import from_wire, to_wire

from .aggregator import Aggregator
from .checkpoints import Checkpoints
from .recorder import RunRecorder
from .screening import ReplyScreen
from .secure_sum import SecureSum
from .validation import ReplyValidator, model_norm, update_norm

log = logging.getLogger("fedseg.server")


def reports_no_score(msg: Message) -> bool:
    """Whether a training reply says its site has too few validation cases to score (keys.NO_SCORE). Never raises."""
    try:
        return not msg.has_error() and msg.content.metric_records[keys.METRICS].get(keys.NO_SCORE) == 1
    except Exception:  # a malformed reply is the validator's to report
        return False


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

    With ``federation.schedule: cyclic`` (cyclical weight transfer) round t trains only the site
    whose turn it is, :math:`k_t = t \bmod K` over the K connected training sites in node-id
    order, so :math:`w^{t+1} = w_{k_t}`: the model makes every site's steps one after another,
    as pooled training does, at the price of K times the rounds for the same patches. With one
    reply a round there is no median of other sites to bound an update by, so cyclic bounds it
    by the model: :math:`\lVert w_{k_t} - w^t \rVert \le c \cdot \max(\lVert w^t \rVert, \lVert w^0 \rVert)`
    (:math:`w^0` the run's first model, so a site that shrinks the model cannot shrink the bound).
    And since the next site is the first to train on :math:`w_{k_t}`, a round whose site replied
    but could not be used (it could not train on the model it got) goes back to the last model
    a site did train on, and the turn moves on: one update no site can train on cannot stall
    the cycle.

    The delta over FedProx: FedAvg's aggregation would average in the wire dtype (float16
    may travel) and raise on one inconsistent reply, so the aggregate hooks screen instead (a
    bad reply is logged and left out) and combine in float32 (server/aggregator.py): the mean
    above, or the unweighted coordinate-wise ``trimmed_mean`` / ``median``, then optionally
    Flower's FedAdam or FedYogi step on :math:`w_{agg} - w^t`. Below ``federation.min_sites``
    sound sites the round is skipped (the model is kept) or the run stops. Metrics are averaged
    by FedAvg's ``train_metrics_aggr_fn``; the log lines, checkpoints and best model are the run
    recorder's (server/recorder.py).

    Evaluation rides with training: from its second round on, this run's training message asks
    each site to score the model it carries, :math:`w^t` with the site's own norm tensors, before
    training on it (``keys.EVALUATE_RECEIVED``). That is exactly what a separate evaluation of
    round t would have scored, so round t's Dice and best-model choice are unchanged; they are
    recorded when round t + 1's replies arrive, and only the last round sends an evaluation
    message of its own. A round therefore costs one message per site instead of two.

    With ``federation.secure_aggregation: secagg+`` the round goes through ``secure_sum``
    (server/secure_sum.py): ``configure_train`` runs the key and share exchanges before the
    training messages leave, and ``aggregate_train`` takes ``secure_mean`` instead of the three
    steps below: w^t plus the unmasked sum of the surviving sites' clipped updates over their
    number (every site weighs 1; the centre never holds one update), then the server optimizer
    and ``publish`` as usual.

    ``aggregate_train`` is three public steps: ``screen_train`` (the sound replies), ``combine``
    (quorum and aggregate) and ``publish`` (the round's model on disk). A wrapper composes by
    calling them itself: central DP (server/dp.py) clips the sound updates, asks ``combine``
    for the unweighted mean, noises it, lets the server optimizer step on the noised mean (which
    is post-processing, so it costs no privacy) and publishes the result.
    """

    def __init__(self, cfg: FedsegConfig, signature: str, shapes: dict[str, tuple[int, ...]],
                 metrics_log: MetricsLog, checkpoints: Checkpoints, round_offset: int = 0) -> None:
        quorum = cfg.federation.min_sites
        super().__init__(min_train_nodes=quorum, min_evaluate_nodes=quorum, min_available_nodes=quorum,
                         weighted_by_key=keys.NUM_EXAMPLES, arrayrecord_key=keys.ARRAYS,
                         configrecord_key=keys.CONFIG, proximal_mu=cfg.train.proximal_mu)
        self.cfg = cfg
        self.signature = signature
        self.round_offset = round_offset
        self.node_sites: dict[int, str] = {}
        self.shapes = shapes
        self.screen = ReplyScreen(ReplyValidator(signature, shapes, cfg.federation.norm_bound), self.node_sites)
        self.recorder = RunRecorder(metrics_log, checkpoints)
        self.aggregator = Aggregator(cfg.federation)
        self.reference: dict[str, np.ndarray] | None = None
        """w^t, the global tensors as sent for training this round: the origin of every site's update."""
        self.sent: ArrayRecord | None = None
        """w^t as this round's configure_train received it (full precision)."""
        self.first_norm: float | None = None
        """Cyclic: ||w^0||, the run's first model, a floor under the model norm that bounds an update."""
        self.trained_on: ArrayRecord | None = None
        """Cyclic: the last global model a site trained on soundly, which a stalled round goes back to."""
        self.secure_sum = SecureSum(cfg, shapes, self.recorder, self.screen) \
            if cfg.federation.secure_aggregation != "none" else None
        """SecAgg+ (server/secure_sum.py): its exchanges wrap the training message, and the centre gets the sum."""

    def summary(self) -> None:
        log.info("fedseg: norm_mode=%s quorum=%d on_quorum_failure=%s wire=%s",
                 self.cfg.train.norm_mode, self.cfg.federation.min_sites,
                 self.cfg.federation.on_quorum_failure, self.cfg.federation.wire_dtype)
        super().summary()

    def _send(self, configure: Callable[..., Iterable[Message]], server_round: int, arrays: ArrayRecord,
              config: ConfigRecord, grid: Grid) -> tuple[list[Message], ArrayRecord]:
        """FedProx's messages, carrying the global model in the wire dtype and the model signature."""
        config[keys.SIGNATURE] = self.signature
        config[keys.WIRE_DTYPE] = self.cfg.federation.wire_dtype
        wire = to_wire(from_wire(arrays), self.cfg.federation.wire_dtype)
        self.screen.outgoing = list(configure(server_round + self.round_offset, wire, config, grid))
        return self.screen.outgoing, wire

    def _last(self, server_round: int) -> bool:
        return server_round + self.round_offset >= self.cfg.federation.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self.recorder.start_round(rnd)
        config[keys.EVALUATE_RECEIVED] = server_round > 1  # the previous round of this run is still open
        messages, wire = self._send(super().configure_train, server_round, arrays, config, grid)
        if self.cfg.federation.schedule == "cyclic" and messages:
            messages = self.screen.outgoing = [self._in_turn(rnd, messages)]
        if self.secure_sum is not None:  # keys and shares first; only the sites whose shares went round train
            messages = self.screen.outgoing = self.secure_sum.configure(rnd, messages, grid)
        self.reference = {k: v.numpy().astype(np.float32) for k, v in wire.items()}
        self.sent = arrays
        if self.first_norm is None:
            self.first_norm = model_norm(self.reference)
        self.recorder.sent(rnd, wire, len(messages), training=True)
        return messages

    @staticmethod
    def _in_turn(rnd: int, messages: list[Message]) -> Message:
        """Cyclic schedule: the message of the site whose turn round ``rnd`` is, the connected training
        sites taken in a fixed order (by node id) so that each gets every K-th round."""
        ordered = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        return ordered[(rnd - 1) % len(ordered)]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The last round's evaluation; every earlier one travels with the next round's training."""
        if not self._last(server_round):
            return []
        messages, wire = self._send(super().configure_evaluate, server_round, arrays, config, grid)
        # a site that said it has too few validation cases to score is not asked for a score
        messages = [m for m in messages if self.node_sites.get(m.metadata.dst_node_id) not in self.recorder.unscored]
        self.recorder.sent(server_round + self.round_offset, wire, len(messages), training=False)
        return messages

    def _sound(self, rnd: int, replies: Iterable[Message], is_train: bool) -> list[tuple[Message, str]]:
        """The sound replies with their sites; every other one is logged with its site and reason."""
        sound = []
        for msg, site, problem in self.screen.verdicts(replies, is_train, self.reference if is_train else None):
            if problem is None:
                sound.append((msg, site))
            else:
                self.recorder.rejected(rnd, site, "train" if is_train else "evaluate", problem)
        return sound

    def _close_previous(self, rnd: int, replies: list[Message]) -> None:
        """Record the evaluations of round ``rnd``'s model that came with the next round's training, and
        close round ``rnd``."""
        for msg, site, problem in self.screen.received(replies):
            if problem is not None and reports_no_score(msg):
                self.recorder.no_score(rnd, site)
            elif problem is None:
                self.recorder.evaluated(rnd, site, msg.content.metric_records[keys.EVALUATION])
            else:
                self.recorder.rejected(rnd, site, "evaluate", problem)
        # Cyclic: the evaluation came from the one site in turn, and Dice of different sites is no ranking;
        # the last round, which every site evaluates, is the best-model candidate.
        self.recorder.close_round(rnd, offer_best=self.cfg.federation.schedule != "cyclic")

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Step 1: the round's sound training replies, each logged with the digest of what arrived
        (after the previous round is closed with the evaluations they carry)."""
        rnd = server_round + self.round_offset
        replies = list(replies)
        if server_round > 1:
            self._close_previous(rnd - 1, replies)
        with self.recorder.timed(rnd):
            sound = self._sound(rnd, replies, is_train=True)
            if self.cfg.federation.schedule == "cyclic":
                sound = [(msg, site) for msg, site in sound if self._cyclic_step_fits(rnd, msg, site)]
                if sound:
                    self.trained_on = self.sent
            for msg, site in sound:
                self.recorder.trained(rnd, site, msg)
        return [msg for msg, _ in sound]

    def _cyclic_step_fits(self, rnd: int, msg: Message, site: str) -> bool:
        """Cyclic: whether the update in turn is within ``norm_bound`` times the model's norm (or w^0's, if
        larger); one that is not is logged as the site's failure. Its weights would become the model."""
        if self.cfg.federation.norm_bound <= 0 or self.reference is None:
            return True
        scale = max(model_norm(self.reference), self.first_norm or 0.0)
        norm = update_norm(msg.content.array_records[keys.ARRAYS], self.reference)
        if norm <= self.cfg.federation.norm_bound * scale:
            return True
        self.recorder.rejected(rnd, site, "train", f"update norm {norm:.4g} exceeds {self.cfg.federation.norm_bound:g}"
                                                   f" x the model's norm {scale:.4g} (cyclic schedule)")
        return False

    def _stalled_cycle(self, rnd: int, replies: list[Message]) -> ArrayRecord | None:
        """Cyclic: the model to go back to when the site in turn replied but its reply could not be used.

        The model it got, w_k of the site before it, was never trained on: it is the suspect, and keeping it
        would fail every later site the same way. The last model a site did train on takes its place, and
        the next round's site takes its turn. None (keep the model) when the site did not reply itself (no
        reply, or the SuperLink's word that its node went away), or the model sent is already that one.
        """
        from_site = [m for m in replies if m.metadata.src_node_id != SUPERLINK_NODE_ID]  # not "the node went away"
        if self.cfg.federation.schedule != "cyclic" or not from_site or self.trained_on is None \
                or self.trained_on is self.sent:
            return None
        log.warning("round %d: the site in turn could not train on the model it got; going back to the last "
                    "model a site trained on, and on to the next site", rnd)
        return self.trained_on

    def combine(self, server_round: int, sound: list[Message], equal_weights: bool = False,
                server_step: bool = True) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Step 2: the aggregate of the sound replies (moved by the server optimizer unless
        ``server_step`` is off), or (None, None) below the quorum."""
        rnd = server_round + self.round_offset
        if len(sound) < self._quorum():
            self._below_quorum(rnd, len(sound))
            return None, None
        with self.recorder.timed(rnd):
            aggregate = self.aggregator(rnd, sound, self.reference, equal_weights, server_step)
        metrics = [RecordDict({keys.METRICS: msg.content.metric_records[keys.METRICS]}) for msg in sound]
        return aggregate, self.train_metrics_aggr_fn(metrics, self.weighted_by_key)

    def publish(self, server_round: int, aggregate: ArrayRecord) -> None:
        """Step 3: make ``aggregate`` the round's global model on disk, with the server optimizer's
        moments that a resume from this round continues with."""
        rnd = server_round + self.round_offset
        if self.aggregator.server_optimizer is not None:
            self.recorder.checkpoints.save_optimizer(rnd, self.aggregator.server_optimizer.state())
        self.recorder.saved(rnd, aggregate)

    def resume_optimizer(self, from_round: int) -> None:
        """Continue the server optimizer with the moments saved after ``from_round``'s step (the round
        whose model the run resumes from); without them it starts from zero, which is logged."""
        optimizer = self.aggregator.server_optimizer
        if optimizer is None or from_round == 0:
            return
        try:
            moments = self.recorder.checkpoints.optimizer(from_round)
        except (OSError, SafetensorError) as err:
            moments, problem = None, f"unreadable ({err})"
        else:
            problem = "none saved" if moments is None else self._moments_problem(moments)
        if problem is not None:
            log.warning("server optimizer moments of round %d: %s; they start again from zero", from_round, problem)
            return
        optimizer.load_state(moments)

    def _moments_problem(self, moments: dict[str, np.ndarray]) -> str | None:
        """Why saved moments cannot continue this run's model (another model, a damaged file, values that are not
        finite), or None."""
        for name, value in moments.items():
            key = name.split("/", 1)[-1]
            if key not in self.shapes or tuple(value.shape) != tuple(self.shapes[key]):
                return f"'{name}' does not fit the model"
            if not np.isfinite(value).all():  # a damaged file: one NaN moment makes every later model NaN
                return f"'{name}' holds NaN or Inf"
            if name.startswith("v/") and (value < 0).any():  # Adam/Yogi divide by sqrt(v)
                return f"'{name}' holds a negative second moment"
        if {name.split("/", 1)[-1] for name in moments} != set(self.shapes):
            return "they do not cover every shared tensor"
        return None

    def _quorum(self) -> int:
        """Sound training replies a round needs: federation.min_sites, or the one site in turn (cyclic)."""
        return 1 if self.cfg.federation.schedule == "cyclic" else self.min_train_nodes

    def _below_quorum(self, rnd: int, sites_ok: int) -> None:
        action = self.cfg.federation.on_quorum_failure
        self.recorder.below_quorum(rnd, "train", sites_ok, action)
        msg = f"round {rnd}: only {sites_ok} site(s) completed train, quorum is {self._quorum()}"
        if action == "stop":
            raise QuorumNotReached(msg + "; stopping as configured (federation.on_quorum_failure: stop).")
        log.warning("%s; keeping the previous global model", msg)

    def secure_mean(self, server_round: int, replies: Iterable[Message], denominator: int | None = None
                    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Steps 1 and 2 under secure aggregation: w^t plus the unmasked sum of the survivors' updates over
        ``denominator`` (by default their number), before any server step; (None, None) below the quorum."""
        rnd = server_round + self.round_offset
        replies = list(replies)
        if server_round > 1:
            self._close_previous(rnd - 1, replies)
        with self.recorder.timed(rnd):
            total, survivors = self.secure_sum.aggregate(rnd, replies)
            for msg, site in survivors:
                self.recorder.trained(rnd, site, msg)
        if total is None or len(survivors) < self._quorum():
            self._below_quorum(rnd, len(survivors) if total is not None else 0)
            return None, None
        update = self.secure_sum.mean_update(total, denominator or len(survivors))
        mean = ArrayRecord({k: Array(np.ascontiguousarray(self.reference[k] + update[k])) for k in self.reference})
        names = set.intersection(*(set(msg.content.metric_records[keys.METRICS]) for msg, _ in survivors))
        metrics = {k: float(np.mean([float(msg.content.metric_records[keys.METRICS][k]) for msg, _ in survivors]))
                   for k in sorted(names - set(keys.TIMELINE_METRICS))}
        return mean, MetricRecord(metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.secure_sum is not None:
            aggregate, metrics = self.secure_mean(server_round, replies)
            if aggregate is not None:
                aggregate = self.aggregator.step(server_round + self.round_offset, self.reference, aggregate)
                self.publish(server_round, aggregate)
            return aggregate, metrics
        replies = list(replies)
        aggregate, metrics = self.combine(server_round, self.screen_train(server_round, replies))
        if aggregate is None:
            aggregate = self._stalled_cycle(server_round + self.round_offset, replies)
        if aggregate is not None:
            self.publish(server_round, aggregate)
        return aggregate, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self._last(server_round):
            return None
        rnd = server_round + self.round_offset
        sound = self._sound(rnd, replies, is_train=False)
        for msg, site in sound:
            self.recorder.evaluated(rnd, site, msg.content.metric_records[keys.METRICS])
        summary = self.recorder.close_round(rnd)
        return MetricRecord(summary) if sound else None
