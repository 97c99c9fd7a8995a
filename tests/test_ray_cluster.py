"""The simulation joins a running Ray cluster (simulation.ray_address) instead of starting its own.

A Ray head is started on 127.0.0.1 as a separate process (as an operator would
with `ray start --head`), the cyclic simulation that test_cyclic checks is
pointed at it (``cyclic_run``, tests/helpers/ray_head.py), and the head's own
logs must show the simulation's driver and its sites' actors; the head and
everything it started are stopped afterwards.
"""

from __future__ import annotations

import pytest

from common.config import load_config
from simulations.runner import federation_config


def test_federation_config_asks_for_a_gpu_share_and_leaves_cpus_to_a_joined_cluster():
    local = load_config(None, ["simulation.gpus_per_site=0.25", "simulation.ray_num_cpus=3"])
    assert "num-supernodes=3" in federation_config(local, 3)
    assert "client-resources-num-gpus=0.25" in federation_config(local, 3)
    assert "init-args-num-cpus=3" in federation_config(local, 3)
    joined = load_config(None, ["simulation.ray_address=10.0.0.5:6379"])
    assert "init-args-num-cpus" not in federation_config(joined, 3)


@pytest.mark.simulation
@pytest.mark.processes
def test_simulation_runs_on_an_existing_ray_cluster(cyclic_run):
    assert cyclic_run.events[-1]["event"] == "run-end" and cyclic_run.events[-1]["status"] == "completed"
    assert {e["site"] for e in cyclic_run.events if e["event"] == "train"} == {"site-1", "site-2"}
    assert cyclic_run.driver_logs, "the simulation's driver never connected to the head"
    assert cyclic_run.actor_on_head, "the sites did not run as actors on the head"


def test_own_sites_on_a_ray_cluster_are_warned_about_once_at_start(tmp_path, capsys, caplog):
    """``fedseg-sim run`` with simulation.ray_address and real sites: the warning comes before anything starts.

    The two sites disagree on their channels, so the run is refused right after reading them, before a
    SuperLink or Ray is started; the warning has been said by then. Synthetic sites get none.
    """
    import yaml

    from simulations.cli import main as sim_main
    from tests.helpers.nifti_cases import nnunet_dataset

    sites = {
        n: {"data_dir": str(nnunet_dataset(tmp_path / n, n_cases=2, channels=c))}
        for n, c in {"a": ("CT",), "b": ("CT", "PET")}.items()
    }
    config = tmp_path / "sites.yaml"
    config.write_text(
        yaml.safe_dump(
            {"simulation": {"sites": sites, "ray_address": "10.0.0.5:6379"}, "federation": {"runs_dir": str(tmp_path)}}
        )
    )
    assert sim_main(["run", "--config", str(config)]) == 2
    assert "declares 2 channels" in capsys.readouterr().err
    said = [r for r in caplog.records if "Ray has no authentication" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING" and "10.0.0.5:6379" in said[0].getMessage()

    from simulations.sites import cluster_warning

    assert cluster_warning(load_config(None, ["simulation.ray_address=10.0.0.5:6379"])) is None  # synthetic data
    assert cluster_warning(load_config(config, [])) is not None
    assert cluster_warning(load_config(config, ['simulation.ray_address=""'])) is None  # local Ray
