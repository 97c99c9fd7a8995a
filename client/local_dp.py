r"""Local differential privacy at the site: its update is clipped and noised before it leaves.

With ``site.local_dp_noise_multiplier`` :math:`z > 0` in the site's own
site.yaml, every training reply's travelling tensors :math:`w_k` become

.. math::
    w^t + \mathrm{clip}_C(w_k - w^t) + \mathcal{N}(0, (zC)^2 I),
    \qquad \mathrm{clip}_C(u) = u \min(1, C / \lVert u \rVert_2),

with :math:`C` = ``site.local_dp_clipping_norm`` and :math:`w^t` the
global weights the site received. This is Flower's ``LocalDpMod`` (its clip
is Flower's ``compute_clip_model_update``) applied in fedseg's own reply
path, before the egress guard and before any secure-aggregation masking, so
the centre (and with secure aggregation, anyone who unmasks a sum) only ever
holds the noised update. Only what leaves is touched: the site-local norm
tensors (``split.local``) are neither clipped nor noised, and the site's own
model and saved tensors keep their trained values.

Why not ``LocalDpMod`` itself: it reads NumPyClient-style records, takes its
noise from ``np.random``'s global state, and calibrates it by the classical
bound for one release. fedseg's ClientApps are forked from a warm process
(``site.warm_start``), so a global generator would hand every round the same
noise; here every release draws from a generator seeded with 128 fresh bits
of ``secrets``, unknown to the centre (the training seed is not: it derives
from the run's config).

**The budget.** Two datasets of the site, whether one patient apart or
entirely different, give clipped updates at most :math:`2C` apart, so one
release is :math:`2/z`-GDP for the site's whole data; releases compose
exactly (common/dp_accounting.py, the centre's accountant). Every release is
recorded in the run's ``run.json`` at the site (client/dp_ledger.py) *before* the reply leaves (a
reply that then fails to leave is counted anyway: the budget is never
understated), and ``fedseg-client status`` shows epsilon at
``site.local_dp_delta`` per run and for all runs together (they train on the
same patients). The centre cannot lower or disable any of this: ``site.*``
never comes from the centre's configuration (``common.runs.site_view``).
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
import torch

from common.config import SiteConfig
from common.flower.differential_privacy import compute_clip_model_update, get_norm

from .dp_ledger import RECORD_KEY, budget, record_release
from .site_state import RunState

log = logging.getLogger("fedseg.client")


def clip_update(update: list[np.ndarray], base: list[np.ndarray], clipping_norm: float) -> float:
    """Clip ``update - base`` to ``clipping_norm`` in place (Flower's clip); returns the norm before clipping."""
    norm = get_norm([u - b for u, b in zip(update, base, strict=True)])
    if norm > 0:  # Flower's clip divides by the norm: an unchanged update stays as it is
        compute_clip_model_update(update, base, clipping_norm)
    return norm


def add_noise(arrays: list[np.ndarray], std: float, rng: np.random.Generator | None = None) -> None:
    """Add N(0, std^2) to every coordinate in place, from ``rng`` or a generator seeded with fresh secret bits."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    for array in arrays:
        array += rng.normal(0.0, std, array.shape).astype(array.dtype)


def privatize(
    site_cfg: SiteConfig,
    run: RunState,
    server_round: int,
    received: dict[str, torch.Tensor],
    travelling: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The travelling tensors as they may leave: clipped and noised when the site's local DP is on.

    ``received`` is the global model the round started from (w^t), keyed as
    ``travelling``. The release is recorded before the result is returned.
    """
    z, clip = site_cfg.local_dp_noise_multiplier, site_cfg.local_dp_clipping_norm
    if z <= 0:
        return travelling
    order = list(travelling)
    values = [travelling[k].detach().cpu().numpy().astype(np.float32) for k in order]
    base = [received[k].detach().cpu().numpy().astype(np.float32) for k in order]
    norm = clip_update(values, base, clip)
    add_noise(values, z * clip)
    record_release(run, server_round, z, clip, site_cfg.local_dp_delta)
    epsilon, releases = budget(run.info()[RECORD_KEY])
    log.info(
        "round %d: local DP on this site's update (norm %.4g clipped to %g, noise std %g); epsilon %.4g at "
        "delta %g after %d release(s) in run %s",
        server_round,
        norm,
        clip,
        z * clip,
        epsilon,
        site_cfg.local_dp_delta,
        releases,
        run.name,
    )
    return {k: torch.from_numpy(v) for k, v in zip(order, values, strict=True)}
