"""Shared fixtures; torch gets one thread, as every test machine here has two cores."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory):
    """Three small synthetic sites on disk (real NIfTI), shared by the tests that only read them."""
    from simulations.synthetic import generate_federation

    root = tmp_path_factory.mktemp("sites")
    return generate_federation(root, n_sites=3, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
