"""The rules a configuration must follow beyond each option's type, and the error that names the broken one.

pydantic checks one value at a time; these check values against each other
(strides against channels, DP against the aggregator...), each with a message
that says what to set.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schema import FedsegConfig, SimulationConfig, SiteConfig

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A simulated site's name: it also names a folder."""

RUN_ID = re.compile(r"[0-9a-f]{12}")
"""A run's identity: it names the run's folder at each site, so nothing else may appear in it."""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says how to fix it."""


def check_consistency(cfg: FedsegConfig) -> None:
    """Reject combinations that each look valid alone but cannot work together."""
    m, d, t, f = cfg.model, cfg.data, cfg.train, cfg.federation
    if m.arch == "unet" and len(m.strides) != len(m.channels) - 1:
        raise ConfigError(
            f"model.strides has {len(m.strides)} entries but model.channels has {len(m.channels)}; "
            "UNet needs exactly one stride fewer than channels."
        )
    if len(d.patch_size) not in (0, 3) or len(d.spacing) not in (0, 3):
        raise ConfigError("data.patch_size and data.spacing need three values (x, y, z), or none to use the plan's.")
    if any(v <= 0 for v in d.spacing) or d.max_patch_voxels < 1:
        raise ConfigError("data.spacing values and data.max_patch_voxels must be positive.")
    factor = 1
    for s in m.strides:
        factor *= s
    if any(p % factor for p in d.patch_size):
        raise ConfigError(
            f"data.patch_size {d.patch_size} must be divisible by {factor} (the product of model.strides)."
        )
    if not 0.0 <= d.foreground_fraction <= 1.0:
        raise ConfigError(f"data.foreground_fraction must be in [0, 1], got {d.foreground_fraction}.")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
    if t.personalize_steps < 0 or t.adapt_norm_steps < 0:
        raise ConfigError("train.personalize_steps and train.adapt_norm_steps must be >= 0.")
    if t.prefetch_batches < 0:
        raise ConfigError(f"train.prefetch_batches must be >= 0, got {t.prefetch_batches}.")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device: {t.device!r} is not one of auto, cpu, cuda, cuda:N (e.g. cuda:1).")
    if cfg.simulation.gpus_per_site < 0:
        raise ConfigError(f"simulation.gpus_per_site must be >= 0, got {cfg.simulation.gpus_per_site}.")
    if t.proximal_mu < 0:
        raise ConfigError(f"train.proximal_mu must be >= 0, got {t.proximal_mu}.")
    check_robustness(cfg)
    check_secure_aggregation(cfg)
    check_simulated_sites(cfg.simulation)
    if not 0.01 <= f.poll_interval_s <= 60 or not 0.01 <= cfg.site.poll_interval_s <= 60:
        raise ConfigError("federation.poll_interval_s and site.poll_interval_s must be between 0.01 and 60 seconds.")
    if t.local_steps < 1 or t.batch_size < 1 or f.rounds < 1 or f.min_sites < 1:
        raise ConfigError(
            "train.local_steps, train.batch_size, federation.rounds and federation.min_sites must be >= 1."
        )
    if f.run_name and not SITE_NAME.fullmatch(f.run_name):
        raise ConfigError(
            f"federation.run_name {f.run_name!r} must be letters, digits, '.', '_' or '-' (it names "
            "the run's folder at the centre and at every site)."
        )
    if f.run_id and not RUN_ID.fullmatch(f.run_id):
        raise ConfigError(f"federation.run_id {f.run_id!r} must be 12 hex digits; leave it unset, fedseg draws it.")
    if min(cfg.site.min_cohort, cfg.site.min_local_steps, cfg.site.min_batch_size) < 1:
        raise ConfigError("site.min_cohort, site.min_local_steps and site.min_batch_size must be >= 1.")
    check_local_dp(cfg.site)
    if cfg.site.norm_from_run and not SITE_NAME.fullmatch(cfg.site.norm_from_run):
        raise ConfigError(
            f"site.norm_from_run {cfg.site.norm_from_run!r} must be one folder name under "
            "<state_dir>/runs (<run_name>-<run_id>), letters, digits, '.', '_' or '-'."
        )


def check_robustness(cfg: FedsegConfig) -> None:
    """Robust aggregation and DP settings; DP's noise is calibrated for a plain mean only."""
    f, p = cfg.federation, cfg.privacy
    if not 0.0 <= f.trim_fraction < 0.5:
        raise ConfigError(f"federation.trim_fraction must be in [0, 0.5), got {f.trim_fraction}.")
    if f.norm_bound != 0 and f.norm_bound < 1:
        raise ConfigError(f"federation.norm_bound must be 0 (off) or >= 1, got {f.norm_bound}.")
    if p.noise_multiplier < 0 or p.clipping_norm <= 0 or not 0 < p.delta < 1:
        raise ConfigError(
            "privacy.noise_multiplier must be >= 0, privacy.clipping_norm > 0 and privacy.delta in (0, 1)."
        )
    if not 0 <= f.server_momentum < 1:
        raise ConfigError(f"federation.server_momentum must be in [0, 1), got {f.server_momentum}.")
    if p.noise_multiplier > 0 and f.clip_updates:
        raise ConfigError(
            "privacy.noise_multiplier > 0 clips every update at privacy.clipping_norm already; set "
            "federation.clip_updates: false (a median-relative clip would break the DP accounting)."
        )
    if f.schedule == "cyclic" and (
        f.server_optimizer != "none" or f.aggregator != "mean" or p.noise_multiplier > 0 or f.clip_updates
    ):
        raise ConfigError(
            "federation.schedule: cyclic trains one site per round, whose weights become the model: "
            "set federation.server_optimizer: none, federation.aggregator: mean, "
            "federation.clip_updates: false and privacy.noise_multiplier: 0."
        )
    if p.noise_multiplier > 0 and f.aggregator != "mean":
        raise ConfigError(
            f"privacy.noise_multiplier > 0 needs federation.aggregator: mean (got '{f.aggregator}'): the noise is "
            "calibrated to the sensitivity of a mean of clipped updates."
        )


def check_local_dp(site: SiteConfig) -> None:
    """A site's own local DP: valid numbers, and only over tensors whose noised values stay usable."""
    if site.local_dp_noise_multiplier < 0 or site.local_dp_clipping_norm <= 0 or not 0 < site.local_dp_delta < 1:
        raise ConfigError(
            "site.local_dp_noise_multiplier must be >= 0 (0: off), site.local_dp_clipping_norm > 0 "
            "and site.local_dp_delta in (0, 1)."
        )
    if site.local_dp_noise_multiplier > 0 and site.max_norm_travel == "shared":
        raise ConfigError(
            "site.local_dp_noise_multiplier > 0 with site.max_norm_travel: shared would add noise to "
            "the running statistics that leave (a running variance can turn negative); set "
            "site.max_norm_travel: stats or local."
        )


def check_secure_aggregation(cfg: FedsegConfig) -> None:
    """What cannot run when the centre sees only the sum of the updates, and the protocol's own numbers."""
    f = cfg.federation
    if f.secure_aggregation == "none":
        return
    needs_one_update = [
        *(["federation.norm_bound: 0 (it compares each site's update with the others')"] if f.norm_bound else []),
        *(
            ["federation.aggregator: mean (a trimmed mean or median needs each site's value of every coordinate)"]
            if f.aggregator != "mean"
            else []
        ),
        *(
            [
                "federation.clip_updates: false (it scales each update by the sites' median norm; each site clips its "
                "own to federation.secagg_clip_norm instead)"
            ]
            if f.clip_updates
            else []
        ),
        *(
            ["federation.schedule: parallel (cyclic makes one site's update the model: there is no sum to hide it in)"]
            if f.schedule != "parallel"
            else []
        ),
    ]
    if needs_one_update:
        raise ConfigError(
            "federation.secure_aggregation: secagg+ shows the centre only the sum of the round's "
            "updates, so nothing that needs one site's update can run; set " + "; ".join(needs_one_update) + "."
        )
    if not 0.5 < f.secagg_threshold <= 1 or f.secagg_clip_norm <= 0:
        raise ConfigError(
            f"federation.secagg_threshold must be in (0.5, 1] (a majority: fewer shares could unmask a "
            f"site) and federation.secagg_clip_norm > 0; got {f.secagg_threshold} and "
            f"{f.secagg_clip_norm}."
        )


def check_simulated_sites(sim: SimulationConfig) -> None:
    """The user's own simulated sites: each names a folder, and at least one of them trains."""
    for name, site in sim.sites.items():
        if not SITE_NAME.fullmatch(name):
            raise ConfigError(
                f"simulation.sites: site name {name!r} must be letters, digits, '.', '_' or '-' "
                "(it names the site's state folder and appears in the metrics log)."
            )
        if not site.data_dir:
            raise ConfigError(
                f"simulation.sites.{name}.data_dir is empty: set it to the site's nnU-Net raw or "
                "Decathlon dataset folder."
            )
    if sim.sites and all(site.held_out for site in sim.sites.values()):
        raise ConfigError(
            f"simulation.sites: every site ({', '.join(sim.sites)}) is held_out; at least one must train."
        )
