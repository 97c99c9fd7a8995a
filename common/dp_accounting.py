r"""The privacy accountant both sides use: exact composition of Gaussian releases, without sampling.

The centre's DP (server/dp.py) and a site's own local DP (client/local_dp.py)
release one Gaussian-noised, clipped update per round they take part in,
with no sampling amplification. Release :math:`i` with noise std
:math:`z_i` times its sensitivity is :math:`1/z_i`-GDP; releases compose
exactly to :math:`\mu = \sqrt{\sum_i z_i^{-2}}` (Gaussian differential
privacy, Dong, Roth & Su 2019), and epsilon at delta follows from the exact
privacy profile of the Gaussian mechanism (Balle & Wang 2018):

.. math::
    \delta(\varepsilon) = \Phi\left(-\frac{\varepsilon}{\mu} + \frac{\mu}{2}\right)
      - e^{\varepsilon}\,\Phi\left(-\frac{\varepsilon}{\mu} - \frac{\mu}{2}\right).

One module, imported by the centre and by every site, so the epsilon a site
shows (``fedseg-client status``) and the one the centre logs are computed by
the same code; tests check it against dp-accounting's PLD accountant.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

ACCOUNTANT = "gaussian-dp exact composition, no sampling amplification"


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism, computed in log space so large epsilon does not overflow."""
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    return float(ndtr(a) - math.exp(epsilon + log_ndtr(b)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with (epsilon, delta)-DP for a mu-GDP mechanism; 0 for mu = 0 (nothing released)."""
    if mu <= 0 or gaussian_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gaussian_delta(high, mu) > delta:  # delta(epsilon) falls monotonically: bracket the root
        high *= 2
    return float(brentq(lambda eps: gaussian_delta(eps, mu) - delta, 0.0, high, xtol=1e-12, rtol=1e-10))


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Smallest epsilon with (epsilon, delta)-DP after ``releases`` Gaussian releases of multiplier z."""
    if releases <= 0:
        return 0.0
    return gdp_epsilon(math.sqrt(releases) / noise_multiplier, delta)


def composed_mu(noise_multipliers: list[float]) -> float:
    """mu of releases made with these multipliers (each relative to its own sensitivity), composed exactly."""
    return math.sqrt(sum(1.0 / z**2 for z in noise_multipliers))
