r"""Central differential privacy: Flower's server-side fixed-clipping wrapper, and the budget it spends.

With ``privacy.noise_multiplier`` :math:`z > 0`, every round the server

1. screens the replies as always (server/validation.py), so a malformed or
   hostile reply is rejected before anything is computed from it,
2. clips each sound update to L2 norm :math:`C` (``privacy.clipping_norm``):
   :math:`w_k \leftarrow w^t + (w_k - w^t)\min(1, C / \lVert w_k - w^t \rVert)`,
3. takes the unweighted mean over the :math:`m` sound sites and adds
   :math:`\mathcal{N}(0, (zC/m)^2)` to every coordinate.

Steps 2 and 3 are Flower's ``DifferentialPrivacyServerSideFixedClipping``.
It clips every ArrayRecord of a reply; fedseg's replies hold exactly one, the
travelling tensors, so site-local norm tensors are neither clipped nor noised
(they never reach the server). The wrapper pairs reply and global arrays by
position, so each reply's arrays are first put in the global model's key order.

The guarantee is site-level (adding or removing one site's whole update)
(epsilon, delta)-DP of the sequence of released global models, against anyone
who sees those models (sites, checkpoints, a stolen model), assuming the
server itself is trusted: it sees each update before clipping. Per-site
metrics (loss, Dice) are not covered. Every site takes part in every round,
so there is no sampling amplification: T released rounds compose exactly to a
Gaussian mechanism with :math:`\mu = \sqrt{T}/z` (Gaussian differential
privacy, Dong, Roth & Su 2019), and epsilon at ``privacy.delta`` follows from
the exact privacy profile of the Gaussian mechanism (Balle & Wang 2018):

.. math::
    \delta(\varepsilon) = \Phi\left(-\frac{\varepsilon}{\mu} + \frac{\mu}{2}\right)
      - e^{\varepsilon}\,\Phi\left(-\frac{\varepsilon}{\mu} - \frac{\mu}{2}\right).

Flower's own accountant (``flwr.supercore.privacy_accounting``) needs the
optional ``dp-accounting`` package and a strategy using FedAvg's
``aggregate_train`` unchanged, which fedseg's is not; the formula above is
exact for this setting, so no extra dependency is needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from scipy.special import log_ndtr, ndtr

from common import keys
from common.config import PrivacyConfig
from common.metrics_log import MetricsLog

from .strategy import FedSegStrategy

log = logging.getLogger("fedseg.server")

ACCOUNTANT = "gaussian-dp exact composition, no sampling amplification"
BISECTION_STEPS = 200


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism, computed in log space so large epsilon does not overflow."""
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    return float(ndtr(a) - math.exp(epsilon + log_ndtr(b)))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Smallest epsilon with (epsilon, delta)-DP after ``releases`` Gaussian releases of multiplier z."""
    if releases <= 0:
        return 0.0
    mu = math.sqrt(releases) / noise_multiplier
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, mu) > delta:
        low, high = high, high * 2
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if gaussian_delta(mid, mu) > delta else (low, mid)
        if high - low <= 1e-9 * high:
            break
    return high


def _in_order(record: ArrayRecord, order: list[str]) -> ArrayRecord:
    """The same tensors as float32, in the global model's key order (Flower clips by position)."""
    return ArrayRecord({k: Array(record[k].numpy().astype(np.float32)) for k in order})


class FedSegDifferentialPrivacy(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side clipping wrapper around fedseg's strategy, with screening first and a budget log."""

    def __init__(self, strategy: FedSegStrategy, privacy: PrivacyConfig, metrics_log: MetricsLog) -> None:
        super().__init__(
            strategy,
            noise_multiplier=privacy.noise_multiplier,
            clipping_norm=privacy.clipping_norm,
            num_sampled_clients=max(1, strategy.cfg.federation.min_sites),
        )
        self.fedseg = strategy
        self.delta = privacy.delta
        self.metrics = metrics_log
        self.releases = strategy.round_offset
        """Released rounds so far; a resumed run assumes every earlier round was released with this z."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sound = self.fedseg.screen_train(server_round, replies)
        order = list(self.current_arrays.keys())
        for msg in sound:
            msg.content[keys.ARRAYS] = _in_order(msg.content.array_records[keys.ARRAYS], order)
        # Noise is calibrated to the sites actually averaged: the mean's sensitivity is C / m.
        self.num_sampled_clients = max(1, len(sound))
        arrays, metrics = super().aggregate_train(server_round, sound)
        if arrays is not None:
            rnd = server_round + self.fedseg.round_offset
            self.fedseg.publish(rnd, arrays)
            self.releases += 1
            epsilon = gaussian_epsilon(self.noise_multiplier, self.releases, self.delta)
            self.metrics.write(
                "privacy", round=rnd, epsilon=epsilon, delta=self.delta, releases=self.releases,
                noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm, sites=len(sound),
                noise_std=self.noise_multiplier * self.clipping_norm / len(sound), accountant=ACCOUNTANT,
            )
            log.info("round %d: DP release %d, epsilon %.4g at delta %g", rnd, self.releases, epsilon, self.delta)
        return arrays, metrics


def with_privacy(strategy: FedSegStrategy, privacy: PrivacyConfig, metrics_log: MetricsLog) -> Strategy:
    """The strategy the ServerApp runs: wrapped in central DP when the config asks for it."""
    if privacy.noise_multiplier <= 0:
        return strategy
    return FedSegDifferentialPrivacy(strategy, privacy, metrics_log)
