"""Benchmark: how the simulation and the server scale with the number of sites (5, 10, 20).

Part 1 runs the real local simulation (``simulations.runner.run_simulation``:
private SuperLink, Flower's simulation engine, the same ServerApp and
ClientApp as a deployment) with a tiny model and tiny synthetic sites, and
prints per site count:

- peak memory: the largest total resident memory of this process and every
  process it started (SuperLink, simulation runtime, Ray workers, ClientApps),
  sampled every 0.2 s from /proc;
- server aggregation seconds per round: the ``aggregation_s`` of each round
  in metrics.jsonl (validation of every reply plus aggregation);
- seconds per round: the ``duration_s`` of each round (train + evaluate).

Sites run in turns: Ray runs at most ``ray_num_cpus / cpus_per_site`` of them
at once, whatever the number of sites, so memory stays bounded.

Part 2 times the server alone on the default model (fedseg's real size), with
N real training replies built in memory: validation plus aggregation for the
mean, the coordinate median and the trimmed mean, to show how the server's
cost grows with the number of sites.

    .venv/bin/python benchmarks/bench_scale.py [--sites 5 10 20] [--rounds 2] [--skip-simulation]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common.config import load_config
from common.metrics_log import read_events

TINY = [
    "model.channels=[8, 16, 32]",
    "model.strides=[2, 2]",
    "model.num_res_units=1",
    "data.patch_size=[16, 16, 16]",
    "train.local_steps=5",
    "train.batch_size=2",
    "train.hd95=false",
    "simulation.cases_per_site=4",
    "simulation.volume_shape=[32, 32, 24]",
    "simulation.ray_num_cpus=2",
    "simulation.cpus_per_site=1",
]
SAMPLE_S = 0.2
PAGE_KIB = 1024
GIB = 1024**3
SERVER_REPEATS = 3
UPDATE_SCALE = 1e-3
"""Std of the random updates in part 2; only the arithmetic is timed, so any small value will do."""


# --- part 1: the simulation ------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * PAGE_KIB
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the total RSS of this process tree in a background thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_rss_bytes(p) for p in _descendants(os.getpid())))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def simulate(n_sites: int, rounds: int, work: Path) -> dict:
    from simulations.runner import run_simulation

    cfg = load_config(
        None,
        [
            *TINY,
            f"simulation.num_sites={n_sites}",
            f"federation.rounds={rounds}",
            f"federation.runs_dir={work / 'runs'}",
            f"federation.run_name=scale-{n_sites}",
            f"simulation.data_dir={work / f'data-{n_sites}'}",
        ],
    )
    started = time.perf_counter()
    with PeakMemory() as memory:
        run = run_simulation(cfg, show=lambda line: None)
    wall = time.perf_counter() - started
    rounds_done = [e for e in read_events(run / "metrics.jsonl") if e["event"] == "round"]
    return {
        "sites": n_sites,
        "peak_gib": memory.peak / GIB,
        "aggregation_s": float(np.mean([e["aggregation_s"] for e in rounds_done])),
        "round_s": float(np.mean([e["duration_s"] for e in rounds_done])),
        "first_round_s": rounds_done[0]["duration_s"],
        "sites_ok": [e["sites_ok"] for e in rounds_done],
        "wall_s": wall,
    }


# --- part 2: the server alone, default model -------------------------------------------


def _train_reply(node: int, content):
    """A site's training reply as the server receives it (metadata as Flower's message factory sets it)."""
    from flwr.app import Message, MessageType, Metadata, RecordDict
    from flwr.app.message.message import make_message

    request = make_message(
        Metadata(
            run_id=1,
            message_id=f"m{node}",
            src_node_id=0,
            dst_node_id=node,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=600.0,
            message_type=MessageType.TRAIN,
        ),
        RecordDict(),
    )
    return Message(content, reply_to=request)


def server_seconds(n_sites: int, aggregator: str, work: Path) -> float:
    """Median seconds FedSegStrategy spends screening and aggregating N replies of the default model."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from common import keys
    from common.metrics_log import MetricsLog
    from server.checkpoints import Checkpoints
    from server.server_app import initial_weights
    from server.strategy import FedSegStrategy

    cfg = load_config(
        None,
        [
            f"federation.aggregator={aggregator}",
            "federation.run_name=server",
            f"federation.runs_dir={work}",
            f"federation.min_sites={n_sites}",
        ],
    )
    weights, signature = initial_weights(cfg)
    rng = np.random.default_rng(0)
    replies = []
    for node in range(1, n_sites + 1):
        arrays = {
            k: Array((v.numpy() + UPDATE_SCALE * rng.standard_normal(v.shape)).astype(np.float32))
            for k, v in weights.items()
        }
        replies.append(
            _train_reply(
                node,
                RecordDict(
                    {
                        keys.ARRAYS: ArrayRecord(arrays),
                        keys.METRICS: MetricRecord(
                            {keys.NUM_EXAMPLES: 10, "loss": 1.0, "proximal_loss": 0.0, "duration_s": 1.0}
                        ),
                        keys.IDENTITY: ConfigRecord({keys.SITE: f"site-{node}", keys.SIGNATURE: signature}),
                    }
                ),
            )
        )
    timings = []
    for repeat in range(SERVER_REPEATS):
        out = work / f"{aggregator}-{n_sites}-{repeat}"
        strategy = FedSegStrategy(
            cfg, signature, {k: tuple(v.shape) for k, v in weights.items()}, MetricsLog(out), Checkpoints(out / "ckpt")
        )
        # What configure_train records: the global model the updates are measured from (norm bound).
        strategy.reference = {k: v.numpy() for k, v in weights.items()}
        strategy.aggregate_train(1, replies)
        timings.append(strategy.recorder.tally(1).aggregation_s)
    return float(np.median(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-simulation", action="store_true", help="Only time the server (part 2).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedseg-scale-") as tmp:
        work = Path(tmp)
        if not args.skip_simulation:
            print(f"Part 1: simulation, tiny model, {args.rounds} rounds, 2 Ray CPUs, 1 CPU per site")
            print(f"{'sites':>5} {'peak GiB':>9} {'agg s/round':>12} {'s/round':>9} {'1st round s':>12} {'wall s':>8}")
            for n in args.sites:
                r = simulate(n, args.rounds, work)
                print(
                    f"{r['sites']:>5} {r['peak_gib']:>9.2f} {r['aggregation_s']:>12.3f} {r['round_s']:>9.1f} "
                    f"{r['first_round_s']:>12.1f} {r['wall_s']:>8.1f}   sites ok per round {r['sites_ok']}",
                    flush=True,
                )
        print(
            f"\nPart 2: server only, default model, validation + aggregation of one round (median of {SERVER_REPEATS})"
        )
        print(f"{'sites':>5} {'mean s':>8} {'median s':>9} {'trimmed s':>10}")
        for n in args.sites:
            row = [server_seconds(n, agg, work) for agg in ("mean", "median", "trimmed_mean")]
            print(f"{n:>5} {row[0]:>8.2f} {row[1]:>9.2f} {row[2]:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
