"""Per-round overhead of a deployed round against the same work in the simulation, and where it goes.

In Flower 1.42 every message a SuperNode receives starts a new ClientApp
process. This script measures:

1. A cold ClientApp start: the wall time of a fresh interpreter importing
   ``client.client_app`` (what each message paid before warm starts), median
   of several runs; and a warm one: launcher to Flower's ClientApp runner
   through a warm parent (client/warm_start.py), plus the timeline's bundle
   check to handler (install, app loading, the bundle's own imports).
2. A deployed federation (real SuperLink, gateway and two SuperNodes with TLS
   and node auth on 127.0.0.1) and the simulation (``fedseg-sim``) running the
   same tiny model, data and rounds. It prints the median round duration of
   each (neither the first round, which fills the preprocessing caches, nor
   the last, which adds an evaluation step of its own), the difference and
   the ratio, the sites' own training time and the median ``timeline`` of a
   train and an evaluate message in both, side by side.

``--flower-defaults`` runs the deployment as before fedseg tuned it: Flower's
3 s polling at the SuperNode and the ServerApp, and a fresh interpreter per
ClientApp (``site.warm_start: false``); only the SuperExec's task polling stays
at fedseg's 0.1 s.

Usage: ``.venv/bin/python benchmarks/bench_round_overhead.py [--rounds 3] [--out DIR] [--flower-defaults]``.
Figures depend on the machine's load; rerun the baseline on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # tests/helpers/deploy_harness.py, the deployed processes the tests start

from common.flower_env import BIN_DIR  # noqa: E402
from server.receiving_grid import STAGES  # noqa: E402
from tests.helpers.deploy_harness import (  # noqa: E402
    GATEWAY_HOST,
    TINY,
    Launched,
    allow,
    events,
    federation_yaml,
    make_site,
    snapshot_app,
    wait_for,
    write_yaml,
)

SITES = ["site-1", "site-2"]
FLOWER_DEFAULTS: dict[str, dict[str, Any]] = {
    "site": {"poll_interval_s": 3.0, "warm_start": False},
    "federation": {"poll_interval_s": 3.0},
}
CASES, SHAPE = 4, (32, 32, 24)
IMPORT_RUNS = 3


def clientapp_start_s() -> list[float]:
    times = []
    for _ in range(IMPORT_RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.client_app"], cwd=ROOT, check=True)
        times.append(time.perf_counter() - started)
    return times


def warm_start_s() -> list[float]:
    """Launcher started -> Flower's ClientApp runner running (here: printing its --help), through a warm parent."""
    from client.warm_start import SOCKET_ENV, new_socket_name

    env = {**os.environ, SOCKET_ENV: new_socket_name()}
    parent = subprocess.Popen(
        [sys.executable, "-m", "client.warm_start"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None  # stdout=PIPE
        parent.stdout.readline()  # "... ready"
        times = []
        for _ in range(IMPORT_RUNS):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", "import sys; from client.warm_start import main; sys.exit(main())", "--help"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                check=True,
            )
            times.append(time.perf_counter() - started)
        return times
    finally:
        parent.kill()
        parent.wait()


def round_stats(run: Path) -> tuple[list[float], list[float]]:
    """(round durations, per-site training durations) of the steady rounds: neither the first (it fills the
    preprocessing caches) nor the last (it adds an evaluation step of its own; every other round's evaluation
    rides with the next round's training)."""
    log = events(run)
    last = max(e["round"] for e in log if e["event"] == "round")
    rounds = [e["duration_s"] for e in log if e["event"] == "round" and 1 < e["round"] < last]
    train = [e["duration_s"] for e in log if e["event"] == "train" and 1 < e["round"] < last]
    return rounds, train


def median_timeline(run: Path, stage: str) -> dict[str, float | None]:
    """Median seconds after creation at which a ``stage`` message passed each stage, rounds 2 on."""
    lines = [e for e in events(run) if e["event"] == "timeline" and e["stage"] == stage and (e["round"] or 0) > 1]
    values = {s: [e[s] for e in lines if e.get(s) is not None] for s in STAGES}
    return {s: statistics.median(v) if v else None for s, v in values.items()}


def bundle_to_handler(run: Path) -> list[float]:
    """Bundle checked -> handler running (FAB install, loading the app, the bundle's own imports), rounds 2 on."""
    return [
        e["imports_done"] - e["bundle_checked"]
        for e in events(run)
        if e["event"] == "timeline"
        and (e["round"] or 0) > 1
        and e.get("bundle_checked") is not None
        and e.get("imports_done") is not None
    ]


def print_timelines(dep: Path, sim: Path) -> None:
    show = lambda v: "-" if v is None else f"{v:7.2f}"  # noqa: E731
    for stage in ("train", "evaluate"):
        d, s = median_timeline(dep, stage), median_timeline(sim, stage)
        print(f"  timeline of a {stage} message (median s after the ServerApp created it):")
        print(f"    {'stage':<20} {'deployed':>8} {'simulated':>9}")
        for name in STAGES:
            print(f"    {name:<20} {show(d[name]):>8} {show(s[name]):>9}")


def deployed(root: Path, rounds: int, flower_defaults: bool) -> Path:
    from server.certs import init_pki
    from simulations.synthetic import generate_federation

    data = generate_federation(root / "data", n_sites=len(SITES), n_cases=CASES, shape=SHAPE, strength=1.0, seed=0)
    app, digest = snapshot_app(root / "app")
    tuning: dict[str, dict[str, Any]] = FLOWER_DEFAULTS if flower_defaults else {"site": {}, "federation": {}}
    fed = federation_yaml(
        root,
        app,
        SITES,
        rounds=rounds,
        min_sites=len(SITES),
        run_name="bench",
        cross_eval=False,
        **tuning["federation"],
    )
    init_pki(root / "certs", [], [GATEWAY_HOST])
    sites = {n: make_site(root, n, data[n], fed, [digest], **tuning["site"]) for n in SITES}
    for name, path in sites.items():
        allow(fed, name, path)
    server = Launched(root / "server.out", "fedseg-server", "start", "--config", str(fed))
    daemons = [Launched(root / f"{n}.out", "fedseg-client", "start", "--config", str(p)) for n, p in sites.items()]
    try:
        wait_for(lambda: server.proc.poll() is not None, 3600, "the deployed run", server, *daemons)
    finally:
        for proc in [*daemons, server]:
            proc.terminate()
    return root / "runs" / "bench"


def simulated(root: Path, rounds: int) -> Path:
    sim = {
        **TINY,
        "federation": {
            "rounds": rounds,
            "min_sites": len(SITES),
            "runs_dir": str(root / "runs"),
            "run_name": "bench-sim",
            "cross_eval": False,
        },
        "simulation": {
            "num_sites": len(SITES),
            "cases_per_site": CASES,
            "volume_shape": list(SHAPE),
            "data_dir": str(root / "sim-data"),
            "ray_num_cpus": 2,
            "cpus_per_site": 1,
        },
    }
    config = write_yaml(root / "sim.yaml", sim)
    subprocess.run([str(BIN_DIR / "fedseg-sim"), "--config", str(config)], check=True)
    return root / "runs" / "bench-sim"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="Rounds (at least 3; 2..rounds-1 are timed).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--flower-defaults",
        action="store_true",
        help="Deploy with Flower's 3 s polling and a fresh interpreter per ClientApp (the baseline).",
    )
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: the first and the last round are not timed")
    root = args.out or Path(tempfile.mkdtemp(prefix="fedseg-bench-"))
    root.mkdir(parents=True, exist_ok=True)

    starts = clientapp_start_s()
    print(
        f"cold ClientApp start (fresh process importing client.client_app): median "
        f"{statistics.median(starts):.2f} s (runs: {', '.join(f'{s:.2f}' for s in starts)})"
    )
    dep_run = deployed(root / "deployed", args.rounds, args.flower_defaults)
    sim_run = simulated(root / "simulated", args.rounds)
    dep_rounds, dep_train = round_stats(dep_run)
    sim_rounds, sim_train = round_stats(sim_run)
    dep, sim = statistics.median(dep_rounds), statistics.median(sim_rounds)
    print(f"rounds 2..{args.rounds - 1}, {len(SITES)} sites, tiny UNet, {CASES} cases of {SHAPE} per site")
    print(f"  deployed round:  median {dep:.1f} s; sites trained for median {statistics.median(dep_train):.1f} s")
    print(f"  simulated round: median {sim:.1f} s; sites trained for median {statistics.median(sim_train):.1f} s")
    print(f"  overhead of deployment: {dep - sim:+.1f} s per round, ratio {dep / sim:.2f}x")
    installs = bundle_to_handler(dep_run)
    if installs and not args.flower_defaults:
        warm = statistics.median(warm_start_s())
        print(
            f"  warm ClientApp start: launcher to Flower's runner {warm:.2f} s + bundle checked to handler "
            f"{statistics.median(installs):.2f} s = {warm + statistics.median(installs):.2f} s "
            "(without waiting for the message's objects, which the timeline shows)"
        )
    print_timelines(dep_run, sim_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
