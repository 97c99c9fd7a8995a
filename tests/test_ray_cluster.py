"""The simulation joins a running Ray cluster (simulation.ray_address) instead of starting its own.

A Ray head is started on 127.0.0.1 as a separate process (as an operator would
with `ray start --head`), a one-round two-site simulation is pointed at it,
and the head's own logs must show the simulation's driver and its sites'
actors; the head and everything it started are stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from common.config import load_config
from common.flower_env import flower_command, free_port
from common.metrics_log import read_events
from common.processes import descendants, stop_tree
from simulations.runner import federation_config, run_simulation
from tests.helpers.tiny import tiny

HEAD_START_S = 60.0


@pytest.fixture
def ray_head():
    """(address, session logs folder) of a one-CPU Ray head; stopped with all its processes afterwards."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    with (temp / "head.log").open("w") as log:
        head = subprocess.Popen(
            [
                flower_command("ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
                "--block",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not open its port in time"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp / "session_latest" / "logs"
    finally:
        stop_tree(head)
        assert not descendants(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_federation_config_asks_for_a_gpu_share_and_leaves_cpus_to_a_joined_cluster():
    local = load_config(None, ["simulation.gpus_per_site=0.25", "simulation.ray_num_cpus=3"])
    assert "num-supernodes=3" in federation_config(local, 3)
    assert "client-resources-num-gpus=0.25" in federation_config(local, 3)
    assert "init-args-num-cpus=3" in federation_config(local, 3)
    joined = load_config(None, ["simulation.ray_address=10.0.0.5:6379"])
    assert "init-args-num-cpus" not in federation_config(joined, 3)


@pytest.mark.simulation
@pytest.mark.processes
def test_simulation_runs_on_an_existing_ray_cluster(tmp_path, ray_head):
    address, head_logs = ray_head
    cfg = load_config(
        None,
        [
            *tiny(),
            "federation.run_name=ray-join",
            f"federation.runs_dir={tmp_path / 'runs'}",
            "federation.rounds=1",
            "federation.cross_eval=false",
            "federation.min_sites=1",
            "simulation.num_sites=1",
            "simulation.cases_per_site=3",
            "simulation.volume_shape=[24, 24, 16]",
            f"simulation.data_dir={tmp_path / 'data'}",
            "simulation.cpus_per_site=1",
            f"simulation.ray_address={address}",
        ],
    )
    run = run_simulation(cfg, show=lambda line: None)
    events = list(read_events(run / "metrics.jsonl"))
    assert events[-1]["event"] == "run-end" and events[-1]["status"] == "completed"
    assert {e["site"] for e in events if e["event"] == "train"} == {"site-1"}
    assert list(head_logs.glob("python-core-driver-*.log")), "the simulation's driver never connected to the head"
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in head_logs.glob("worker-*")), (
        "the site did not run as an actor on the head"
    )


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
