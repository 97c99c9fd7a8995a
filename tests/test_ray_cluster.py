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
from tests.tiny import tiny

HEAD_START_S = 60.0


@pytest.fixture
def ray_head():
    """(address, session logs folder) of a one-CPU Ray head; stopped with all its processes afterwards."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    with (temp / "head.log").open("w") as log:
        head = subprocess.Popen(
            [flower_command("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
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


def test_simulation_runs_on_an_existing_ray_cluster(tmp_path, ray_head):
    address, head_logs = ray_head
    cfg = load_config(None, [
        *tiny(), "federation.run_name=ray-join", f"federation.runs_dir={tmp_path / 'runs'}", "federation.rounds=1",
        "federation.cross_eval=false", "federation.min_sites=1", "simulation.num_sites=1",
        "simulation.cases_per_site=3", "simulation.volume_shape=[24, 24, 16]",
        f"simulation.data_dir={tmp_path / 'data'}", "simulation.cpus_per_site=1", f"simulation.ray_address={address}",
    ])
    run = run_simulation(cfg, show=lambda line: None)
    events = list(read_events(run / "metrics.jsonl"))
    assert events[-1]["event"] == "run-end" and events[-1]["status"] == "completed"
    assert {e["site"] for e in events if e["event"] == "train"} == {"site-1"}
    assert list(head_logs.glob("python-core-driver-*.log")), "the simulation's driver never connected to the head"
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in head_logs.glob("worker-*")), \
        "the site did not run as an actor on the head"
