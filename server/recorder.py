"""What a run leaves behind at the centre: the metrics log's lines, the checkpoints and the best model.

The strategy decides what happens to each reply; the recorder writes it down.
Each round keeps a tally (sites trained and failed, bytes sent both ways, time
spent screening and aggregating, the sites' validation Dice) that ends in one
``round`` line. An aggregated round's model is saved as ``round-NNNN`` and
``last``, then offered as ``best`` by its case-weighted Dice. The weights are
the sites' own case counts, so each is capped (common/fingerprint.py
``bounded_weights``: at most ``WEIGHT_CAP_RATIO`` times the median of the other
sites' counts) besides the receiving boundary's bound by what the site declared
at planning (server/inbound.py): one site claiming many cases cannot pick the
best model alone.

A round's model is evaluated with the next round's training (the sites score
what they receive before they train on it), so round r's tally stays open
until round r + 1's replies close it; only the last round has an evaluation
step of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from common import keys
from common.digest import message_sha256
from common.fingerprint import bounded_weights
from common.metrics_log import Event, MetricsLog
from common.records import number
from common.wire import from_wire

from .checkpoints import Checkpoints

log = logging.getLogger("fedseg.server")


@dataclass
class RoundTally:
    """What happened in one round, for its summary line."""

    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    """When the next round started: a round's duration is its own training and aggregation."""
    bytes_total: int = 0
    bytes_down: int = 0
    """Bytes of the global model sent to each site for training."""
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    aggregated: bool = False
    aggregation_s: float = 0.0
    dice: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    """Each evaluating site's cases; ``dice_weighted`` weighs by them, capped (``bounded_weights``)."""


def _annotator_fields(metrics: MetricRecord) -> dict[str, object]:
    """Dice against the fusion and against each annotator, for sites whose cases have several label files."""
    per_annotator = [float(number(metrics, k)) for k in keys.ANNOTATOR_METRICS[1:] if k in metrics]
    if not per_annotator:
        return {}
    return {"dice_fusion": float(number(metrics, keys.ANNOTATOR_METRICS[0])), "dice_per_annotator": per_annotator}


class RunRecorder:
    """Writes a run's metrics log lines and checkpoints, and keeps each open round's tally."""

    def __init__(self, metrics_log: MetricsLog, checkpoints: Checkpoints) -> None:
        self.metrics = metrics_log
        self.checkpoints = checkpoints
        self.tallies: dict[int, RoundTally] = {}
        self.unscored: set[str] = set()
        """Sites that said they send no validation score (keys.NO_SCORE), each logged once."""

    def tally(self, rnd: int) -> RoundTally:
        return self.tallies.setdefault(rnd, RoundTally())

    def start_round(self, rnd: int) -> None:
        for open_round in self.tallies.values():
            open_round.ended = open_round.ended or time.perf_counter()
        self.tallies[rnd] = RoundTally()

    def sent(self, rnd: int, wire: ArrayRecord, messages: int, training: bool) -> None:
        """The global model went to ``messages`` sites, to train or to evaluate."""
        t = self.tally(rnd)
        if training:
            t.bytes_down = wire.count_bytes()
        t.bytes_total += wire.count_bytes() * messages

    @contextmanager
    def timed(self, rnd: int) -> Iterator[None]:
        """Count the block's time as the round's screening and aggregation time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.tally(rnd).aggregation_s += time.perf_counter() - started

    def rejected(self, rnd: int, site: str, stage: str, reason: str) -> None:
        log.warning("round %d: %s reply of site %s rejected: %s", rnd, stage, site, reason)
        self.metrics.write(Event.FAILURE, round=rnd, site=site, stage=stage, reason=reason)
        if site not in self.tally(rnd).failed:
            self.tally(rnd).failed.append(site)

    def rejecter(self, rnd: int, stage: str) -> Callable[[str, str], None]:
        """``rejected`` for one round and stage: called with a site and the reason."""
        return lambda site, reason: self.rejected(rnd, site, stage, reason)

    def no_score(self, rnd: int, site: str) -> None:
        """A site trained but has too few validation cases to send a score: said once per run, not a failure."""
        if site in self.unscored:
            return
        self.unscored.add(site)
        log.warning(
            "round %d: site %s trains but reports no validation score (fewer validation cases than its "
            "site.min_cohort); the best model is chosen on the other sites' Dice",
            rnd,
            site,
        )
        self.metrics.write(
            Event.NO_SCORE, round=rnd, site=site, reason="fewer validation cases than the site's minimum cohort"
        )

    def trained(self, rnd: int, site: str, msg: Message) -> None:
        """A sound training reply, logged with the digest of what arrived."""
        metrics = msg.content.metric_records[keys.METRICS]
        arrays = msg.content.array_records[keys.ARRAYS]
        t = self.tally(rnd)
        t.trained.append(site)
        t.bytes_total += arrays.count_bytes()
        self.metrics.write(
            Event.TRAIN,
            round=rnd,
            site=site,  # no count under secure aggregation: its mean weighs every site 1
            num_examples=int(number(metrics, keys.NUM_EXAMPLES)) if keys.NUM_EXAMPLES in metrics else None,
            loss=metrics["loss"],
            proximal_loss=metrics["proximal_loss"],
            duration_s=metrics["duration_s"],
            lr=metrics.get(keys.LEARNING_RATE),
            bytes_up=arrays.count_bytes(),
            bytes_down=t.bytes_down,
            **{keys.CONTENT_SHA256: message_sha256(msg)},
        )

    def below_quorum(self, rnd: int, stage: str, sites_ok: int, action: str) -> None:
        self.metrics.write(Event.QUORUM_FAILURE, round=rnd, stage=stage, sites_ok=sites_ok, action=action)
        self.metrics.sync()

    def saved(self, rnd: int, aggregate: ArrayRecord) -> None:
        """``aggregate`` is the round's global model: keep it as ``round-NNNN`` and ``last``."""
        self.checkpoints.save_round(rnd, from_wire(aggregate))
        self.tally(rnd).aggregated = True

    def evaluated(self, rnd: int, site: str, metrics: MetricRecord) -> None:
        per_class = [float(number(metrics, k)) for k in sorted(metrics) if k.startswith(keys.DICE_CLASS_PREFIX)]
        self.metrics.write(
            Event.EVALUATE,
            round=rnd,
            site=site,
            num_examples=int(number(metrics, keys.NUM_EXAMPLES)),
            dice=metrics["dice"],
            dice_per_class=per_class,
            hd95=metrics.get("hd95"),
            loss=metrics["loss"],
            **_annotator_fields(metrics),
        )
        self.tally(rnd).dice.append(float(number(metrics, "dice")))
        self.tally(rnd).weights.append(float(number(metrics, keys.NUM_EXAMPLES)))

    def close_round(self, rnd: int, offer_best: bool = True) -> dict[str, float]:
        """Write the round's summary, offer the model as best (unless ``offer_best`` is off), and make the
        log durable."""
        t = self.tallies.pop(rnd, RoundTally())
        dice_mean = float(np.mean(t.dice)) if t.dice else float("nan")
        dice_weighted = float(np.average(t.dice, weights=bounded_weights(t.weights))) if t.dice else float("nan")
        self.metrics.write(
            Event.ROUND,
            round=rnd,
            sites_ok=len(t.trained),
            sites_failed=t.failed,
            aggregated=t.aggregated,
            dice_mean=dice_mean,
            dice_weighted=dice_weighted,
            duration_s=(t.ended or time.perf_counter()) - t.started,
            bytes_total=t.bytes_total,
            aggregation_s=t.aggregation_s,
        )
        if offer_best and t.aggregated and t.dice:
            self.checkpoints.offer_best(rnd, dice_weighted)
        self.metrics.sync()
        log.info(
            "round %d: %d site(s) trained, %d failed, Dice mean %.4f weighted %.4f",
            rnd,
            len(t.trained),
            len(t.failed),
            dice_mean,
            dice_weighted,
        )
        return {"dice_mean": dice_mean, "dice_weighted": dice_weighted}
