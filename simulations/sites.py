"""Which sites a simulation runs: the user's own datasets (``simulation.sites``) or synthetic ones.

Either way every site is a dataset folder on this machine, read by the very
same ClientApp code a hospital runs. The model's input and output channels
come from the sites' dataset.json and must agree across sites.

Real sites' data on a Ray cluster (``simulation.ray_address``) is said at
start in a warning: Ray has no authentication, so whoever reaches the
cluster's ports runs code on its machines and reads every site's data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.config import ConfigError, FedsegConfig, with_channels
from common.dataset import DatasetError, DatasetSpec, read_dataset

from .synthetic import generate_federation

log = logging.getLogger("fedseg.sim")


def site_names(cfg: FedsegConfig) -> tuple[list[str], list[str]]:
    """(training sites, held-out sites) in the order the simulation numbers its partitions."""
    sim = cfg.simulation
    if sim.sites:
        return ([n for n, s in sim.sites.items() if not s.held_out], [n for n, s in sim.sites.items() if s.held_out])
    names = [f"site-{i + 1}" for i in range(sim.num_sites + sim.held_out_sites)]
    return names[: sim.num_sites], names[sim.num_sites :]


def site_datasets(cfg: FedsegConfig) -> dict[str, Path]:
    """Every site's dataset folder, training sites first; synthetic ones are generated (or reused)."""
    sim = cfg.simulation
    training, held_out = site_names(cfg)
    if sim.sites:
        if warning := cluster_warning(cfg):
            log.warning(warning)
        return {name: Path(sim.sites[name].data_dir).resolve() for name in [*training, *held_out]}
    return generate_federation(
        Path(sim.data_dir),
        n_sites=sim.num_sites + sim.held_out_sites,
        n_cases=sim.cases_per_site,
        shape=tuple(sim.volume_shape),
        strength=sim.shift_strength,
        seed=sim.seed,
        n_test=sim.test_cases_per_site,
    )


def cluster_warning(cfg: FedsegConfig) -> str | None:
    """What to say before real sites' data goes to a Ray cluster, or None (local Ray, or synthetic data).

    Ray's cluster ports (GCS, object store, workers) accept any client that
    reaches them and run what it submits; nothing in Ray or Flower changes
    that. The simulation cannot check the network, so it says it once, at
    the start of every run that joins a cluster with the user's own data.
    """
    sim = cfg.simulation
    if not (sim.ray_address and sim.sites):
        return None
    return (
        f"simulation.ray_address {sim.ray_address}: your own sites' data goes to a Ray cluster. Ray has no "
        "authentication: anyone who can reach the cluster's ports (the head's GCS port, the dashboard, the "
        "object store and worker ports on every node) can run code there and read every site's scans. Keep "
        "those ports reachable from the cluster's own machines only (a private network or a firewall); "
        "see deploy/README.md, 'Ray clusters'."
    )


def read_site_specs(datasets: dict[str, Path]) -> dict[str, DatasetSpec]:
    """Each site's dataset.json and cases; an unreadable one is named with its site."""
    specs = {}
    for name, path in datasets.items():
        try:
            specs[name] = read_dataset(path)
        except DatasetError as err:
            raise ConfigError(f"simulation.sites.{name}: {err}") from err
    return specs


def with_data_channels(cfg: FedsegConfig, specs: dict[str, DatasetSpec]) -> FedsegConfig:
    """The config with model.in_channels/out_channels taken from the sites' dataset.json.

    Every site must declare the same number of channels and classes; the
    first site that disagrees with the first one is named. A count set in
    the config must equal the data's.
    """
    (first, ref), *others = specs.items()
    for name, spec in others:
        for what, mine, theirs in (
            ("channels", spec.num_channels, ref.num_channels),
            ("classes", spec.num_classes, ref.num_classes),
        ):
            if mine != theirs:
                detail = (
                    f"{spec.channel_names} vs {ref.channel_names}"
                    if what == "channels"
                    else f"{spec.labels} vs {ref.labels}"
                )
                raise ConfigError(
                    f"site '{name}' declares {mine} {what} in {spec.root / 'dataset.json'} but site '{first}' "
                    f"declares {theirs} ({detail}); every site's dataset.json must agree."
                )
    detail = f" (site '{first}': {ref.channel_names}, {ref.labels})"
    return cfg.replace(
        model=with_channels(cfg.model, ref.num_channels, ref.num_classes, "the sites' dataset.json", detail)
    )
