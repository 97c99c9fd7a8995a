"""A Ray cluster started apart, as an operator would (``ray start --head``), and the cyclic run made on it.

One simulation serves two concerns: test_cyclic asserts the schedule of its
rounds, test_ray_cluster that it ran on the head rather than on a Ray of its
own (the head's logs name the simulation's driver and its sites' actors).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.config import load_config
from common.flower_env import flower_command, free_port
from common.metrics_log import read_events
from common.processes import descendants, stop_tree
from common.runs import METRICS_FILE
from simulations.runner import run_simulation
from tests.helpers.tiny import tiny

HEAD_START_S = 60.0
CYCLIC_ROUNDS = 4
CYCLIC = tiny(
    "model.norm=instance",
    "federation.schedule=cyclic",
    "federation.server_optimizer=none",
    f"federation.rounds={CYCLIC_ROUNDS}",
    "federation.min_sites=2",
    "train.adapt_norm_steps=2",
    "simulation.num_sites=2",
    "simulation.held_out_sites=1",
    "simulation.cases_per_site=4",
    "simulation.volume_shape=[32, 32, 24]",
    "simulation.cpus_per_site=1",
)
"""Two training sites and one held out, quorum two, four rounds: each round must train one site, in turn."""


@contextmanager
def ray_head() -> Iterator[tuple[str, Path]]:
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


@dataclass(frozen=True)
class CyclicRun:
    """What the cyclic run on the head left: its metrics log, and what the head's own logs showed of it."""

    events: list[dict]
    driver_logs: int
    """The head's ``python-core-driver-*.log`` files: the simulation's driver connected to the head."""
    actor_on_head: bool
    """A worker log of the head names ``ClientAppActor``: the sites ran as actors on the head."""


def cyclic_run_on_head(root: Path) -> CyclicRun:
    """The cyclic simulation of ``CYCLIC`` under ``root``, joined to a Ray head started for it."""
    with ray_head() as (address, head_logs):
        cfg = load_config(
            None,
            [
                *CYCLIC,
                f"federation.runs_dir={root / 'runs'}",
                f"simulation.data_dir={root / 'data'}",
                "federation.run_name=cyclic",
                f"simulation.ray_address={address}",
            ],
        )
        run = run_simulation(cfg, show=lambda line: None)
        return CyclicRun(
            events=list(read_events(run / METRICS_FILE)),
            driver_logs=len(list(head_logs.glob("python-core-driver-*.log"))),
            actor_on_head=any("ClientAppActor" in p.read_text(errors="replace") for p in head_logs.glob("worker-*")),
        )
