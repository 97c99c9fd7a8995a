r"""Central differential privacy: Flower's server-side fixed-clipping wrapper, and the budget it spends.

With ``privacy.noise_multiplier`` :math:`z > 0`, every round the server

1. screens the replies as always (server/validation.py), so a malformed or
   hostile reply is rejected before anything is computed from it,
2. clips each sound update to L2 norm :math:`C` (``privacy.clipping_norm``):
   :math:`w_k \leftarrow w^t + (w_k - w^t)\min(1, C / \lVert w_k - w^t \rVert)`,
3. sums the clipped updates of the :math:`m` sound sites, divides by the
   federation's fixed size :math:`n` (its listed training sites; a missing
   or rejected site counts as a zero update) and adds
   :math:`\mathcal{N}(0, (zC/n)^2)` to every coordinate.

The denominator is fixed on purpose: dividing by :math:`m` would make the
mean's sensitivity depend on how many sites replied, a number that depends on
the data and is published, and under adding or removing one site the
sensitivity of a mean over :math:`m` is not :math:`C/m`. Over :math:`n` it is
exactly :math:`C/n`. The clip is Flower's ``compute_clip_model_update`` and
the noise that of Flower's ``DifferentialPrivacyServerSideFixedClipping``
with its sample size fixed at :math:`n`. ``CentralDP`` is an aggregation step
of the strategy (server/strategy.py, server/round_mean.py), not a wrapper around it: ``clipped``
clips each screened update and scales it by :math:`m/n`, so that the
strategy's unweighted mean over :math:`m` is the sum over :math:`n`, and
``release`` adds the noise and logs the budget; the strategy then lets
``federation.server_optimizer`` step on the noised model (a function of
released values only, so post-processing that spends no budget).
Only the travelling tensors are clipped and noised: a reply holds exactly
those, site-local norm tensors never reach the server. Flower's clip pairs
reply and global arrays by position, so each reply's arrays are first put in
the global model's key order.

The guarantee is site-level (adding or removing one site's whole update)
(epsilon, delta)-DP of the sequence of released global models, against anyone
who sees those models (sites, checkpoints, a stolen model), assuming the
server itself is trusted: it sees each update before clipping. Per-site
metrics (loss, Dice) are not covered. Every site takes part in every round,
so there is no sampling amplification: T released rounds compose exactly to a
Gaussian mechanism with :math:`\mu = \sqrt{T}/z` (Gaussian differential
privacy, Dong, Roth & Su 2019), and epsilon at ``privacy.delta`` follows from
the exact privacy profile of the Gaussian mechanism (Balle & Wang 2018), in
common/dp_accounting.py, the accountant a site's local DP uses too.

Flower's own accountant (``flwr.supercore.privacy_accounting``) needs the
optional ``dp-accounting`` package and a strategy using FedAvg's
``aggregate_train`` unchanged, which fedseg's is not; the formula above is
exact for this setting, so no extra dependency is needed at run time (the
tests check it against dp-accounting's PLD accountant).

With ``federation.secure_aggregation: secagg+`` the sites clip their own
updates to :math:`C` before masking (server/secure_sum.py) and the centre
only ever holds their sum: it divides that by :math:`n` and adds the same
noise. The trust assumption shrinks but does not vanish: the centre no longer
sees one site's update, yet it sees the sum before the noise and is trusted
to add it.

A resumed run counts its earlier releases from the metrics log, and is
refused if they were made with another noise multiplier, clipping norm or
federation size, or without DP: the budget would otherwise be understated.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common import keys
from common.config import FedsegConfig, PrivacyConfig
from common.dp_accounting import ACCOUNTANT, gaussian_epsilon
from common.flower.differential_privacy import compute_clip_model_update
from common.metrics_log import Event, MetricsLog, is_kind, read_events

log = logging.getLogger("fedseg.server")


class PrivacyResumeRefused(RuntimeError):
    """A resumed run's earlier releases were made under other privacy settings (or none)."""


def federation_size(cfg: FedsegConfig) -> int:
    """n: the listed sites that train (held-out sites never send updates)."""
    return len(set(cfg.federation.sites) - set(cfg.federation.held_out_sites))


def _clipped_and_scaled(
    record: ArrayRecord, reference: dict[str, np.ndarray], order: list[str], clipping_norm: float, scale: float
) -> ArrayRecord:
    """w^t + scale * clip_C(w_k - w^t), as float32 in the global model's key order (Flower pairs by position)."""
    values = [record[k].numpy().astype(np.float32) for k in order]
    base = [reference[k] for k in order]
    compute_clip_model_update(values, base, clipping_norm)
    return ArrayRecord(
        {
            k: Array(np.ascontiguousarray(b + np.float32(scale) * (v - b)))
            for k, v, b in zip(order, values, base, strict=True)
        }
    )


def earlier_releases(metrics_path, privacy: PrivacyConfig, size: int, done: int) -> int:
    """Releases made before a resume, refusing any made under other settings or without DP."""
    events = list(read_events(metrics_path)) if metrics_path.is_file() else []
    released = [e for e in events if is_kind(e, Event.PRIVACY) and e["round"] <= done]
    expected = {
        "noise_multiplier": privacy.noise_multiplier,
        "clipping_norm": privacy.clipping_norm,
        "denominator": size,
    }
    for event in released:
        if any(event.get(k) != v for k, v in expected.items()):
            raise PrivacyResumeRefused(
                f"round {event['round']} was released with noise_multiplier {event.get('noise_multiplier')}, "
                f"clipping_norm {event.get('clipping_norm')}, sites {event.get('denominator')}; this run has "
                f"{privacy.noise_multiplier}, {privacy.clipping_norm}, {size}. Resume with the same privacy "
                f"settings and federation.sites, or start a new run."
            )
    released_rounds = {e["round"] for e in released}
    plain = [
        e["round"]
        for e in events
        if is_kind(e, Event.ROUND) and e.get("aggregated") and e["round"] <= done and e["round"] not in released_rounds
    ]
    if plain:
        raise PrivacyResumeRefused(
            f"rounds {plain} were released without DP; no privacy budget covers them. Start a new run."
        )
    return len(released)


class CentralDP:
    """Central DP as an aggregation step: clip each update to C, average over n, add noise of std z C / n."""

    def __init__(self, cfg: FedsegConfig, metrics_log: MetricsLog, done: int) -> None:
        self.size = federation_size(cfg)
        if self.size < 1:
            raise ValueError(
                "privacy.noise_multiplier > 0 needs federation.sites: the noise is calibrated to the "
                "federation's fixed size."
            )
        privacy = cfg.privacy
        self.noise_multiplier, self.clipping_norm, self.delta = (
            privacy.noise_multiplier,
            privacy.clipping_norm,
            privacy.delta,
        )
        self.metrics = metrics_log
        self.rng = np.random.default_rng()
        self.releases = earlier_releases(metrics_log.path, privacy, self.size, done)
        """Released rounds so far, counted from the log (a resumed run's earlier ones included)."""

    def clipped(self, sound: list[Message], reference: dict[str, np.ndarray]) -> list[Message]:
        """Each sound update clipped to C and scaled by m/n: the unweighted mean over m is the sum over n."""
        if len(sound) > self.size:
            raise ValueError(f"{len(sound)} sound replies from a federation of {self.size} listed sites")
        for msg in sound:
            msg.content[keys.ARRAYS] = _clipped_and_scaled(
                msg.content.array_records[keys.ARRAYS],
                reference,
                list(reference),
                self.clipping_norm,
                len(sound) / self.size,
            )
        return sound

    def release(self, rnd: int, mean: ArrayRecord, sites: int) -> ArrayRecord:
        """``mean`` (a sum over n) plus Gaussian noise of std z C / n on every coordinate, logged with the
        epsilon spent so far."""
        std = self.noise_multiplier * self.clipping_norm / self.size
        noised = ArrayRecord(
            {
                k: Array(np.ascontiguousarray(v.numpy() + self.rng.normal(0.0, std, v.shape).astype(v.numpy().dtype)))
                for k, v in mean.items()
            }
        )
        self.releases += 1
        epsilon = gaussian_epsilon(self.noise_multiplier, self.releases, self.delta)
        self.metrics.write(
            Event.PRIVACY,
            round=rnd,
            epsilon=epsilon,
            delta=self.delta,
            releases=self.releases,
            noise_multiplier=self.noise_multiplier,
            clipping_norm=self.clipping_norm,
            sites=sites,
            denominator=self.size,
            noise_std=std,
            accountant=ACCOUNTANT,
        )
        log.info("round %d: DP release %d, epsilon %.4g at delta %g", rnd, self.releases, epsilon, self.delta)
        return noised


def central_dp(cfg: FedsegConfig, metrics_log: MetricsLog, done: int) -> CentralDP | None:
    """The DP step the config asks for (``privacy.noise_multiplier > 0``), or None."""
    return CentralDP(cfg, metrics_log, done) if cfg.privacy.noise_multiplier > 0 else None
