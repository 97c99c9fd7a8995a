"""Shared fixtures; torch gets one thread, as every test machine here has two cores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from common.config import FedsegConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory):
    """Three small synthetic sites on disk (real NIfTI), shared by the tests that only read them."""
    from simulations.synthetic import generate_federation

    root = tmp_path_factory.mktemp("sites")
    return generate_federation(root, n_sites=3, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)


@pytest.fixture(scope="session")
def hostile_round(tmp_path_factory):
    """A five-site federation of the real apps warmed up, then one honest round recorded: the replies the hostile
    site's tests tamper with (test_validation, test_robust; tests/helpers/hostile.py)."""
    from tests.helpers.hostile import trained_round

    return trained_round(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="session")
def quorum_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FedsegConfig, Path, list[str]]:
    """One real Flower simulation (SuperLink, simulation engine, Ray) shared by test_simulation and
    test_tensorboard: the plain federation, no privacy option on (test_dp runs its own with central DP).

    Three tiny sites, the third with a label file that is not NIfTI, so two sites
    carry every round on the quorum; the metrics log is mirrored live to TensorBoard
    (test_tensorboard). Returns (config, run directory, shown lines).
    """
    from common.config import load_config
    from simulations.runner import run_simulation
    from simulations.synthetic import generate_federation
    from tests.helpers.tiny import tiny

    root = tmp_path_factory.mktemp("sim")
    data = root / "data"
    sites = generate_federation(data, n_sites=3, n_cases=4, shape=(32, 32, 24), seed=1)
    victim = sorted((sites["site-3"] / "labelsTr").glob("*.nii.gz"))[0]
    victim.write_bytes(b"not a nifti file")
    cfg = load_config(
        None,
        tiny(
            "federation.run_name=sim-test",
            f"federation.runs_dir={root / 'runs'}",
            "federation.rounds=2",
            "federation.min_sites=2",
            "federation.cross_eval=false",
            "simulation.num_sites=3",
            "simulation.cases_per_site=4",
            "simulation.volume_shape=[32, 32, 24]",
            "simulation.seed=1",
            f"simulation.data_dir={data}",
            "simulation.cpus_per_site=1",
            "simulation.ray_num_cpus=2",
            "train.hd95=true",
            "federation.tensorboard=true",
        ),
    )
    lines: list[str] = []
    run = run_simulation(cfg, show=lines.append)
    return cfg, run, lines


@pytest.fixture
def trained_site(tmp_path):
    """A run folder as the centre hands it out, a site that trained in it (its own norm tensors) and scans:
    (run, site.yaml, scans) of tests/helpers/run_folders.py."""
    from tests.helpers.run_folders import trained_site

    return trained_site(tmp_path)
