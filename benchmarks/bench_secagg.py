"""Benchmark: what secure aggregation (SecAgg+) costs per round, its Dice, and one site dropping mid-round.

Runs the real strategy (server/strategy.py with server/secure_sum.py) against
the real ClientApp of every site (client/client_app.py with client/secagg.py,
local DP and the egress guard included) in one process, through Flower's wire
format: ``tests/helpers/local_grid.py`` deflates every message to bytes and inflates
it again, as a SuperLink stores and forwards it. So the bytes are those a
deployment moves (every message and reply of the protocol, the key and
share exchanges included), and the seconds are the sites' and the centre's
work, the sites taking turns; what a deployment adds per message (polling,
a ClientApp process per message: about 1.6 s, docs/benchmarks.md) is not in
them.

Part 1, the default model (4.8 M travelling parameters), 3, 5 and 10
sites, plain and ``federation.secure_aggregation: secagg+``, round 2 of 2
(round 1 prepares each site's cache; round 2 carries the evaluation of round
1's model, as every later round does; the run's closing evaluation message,
the same in both modes, is not delivered): bytes down and up, messages, a site's mean
seconds over all its messages of the round and, of those, SecAgg+'s clip,
quantization and masking (client/secagg.py ``masked_update``), the centre's
aggregation seconds (plain: validation and the mean; SecAgg+: unmasking and
the checked sum), and the round with the sites in turn. Local training is
kept tiny (1 step of two 16^3 patches), so the protocol's cost is not hidden
under it; in a deployment the sites work at once, and each extra message
costs its own round trip.

Part 2, Dice at equal settings: the small model and budget of
benchmarks/bench_dp.py, 3 sites, plain and SecAgg+, the same seed, data and
split (3 training cases per site, so the plain mean's case weights are equal
too), ``federation.norm_bound: 0`` in both (SecAgg+ needs it); then local DP
at every site (``site.local_dp_*`` in each site's own site.yaml) at a few
noise levels, with the epsilon each site has spent after the run.

Part 3, one site drops in round 2 (default model, 5 sites): before its
masked update (the training message never reaches it: its pairwise masks
are rebuilt from the others' shares and removed) or after it (the unmask
request never reaches it: its update still counts). The grid holds the
message, as a dead site's SuperNode would, so the round waits for it until
``federation.round_timeout_s`` (set to BENCH_TIMEOUT_S here), as deployed.

    .venv/bin/python benchmarks/bench_secagg.py [--sites 3 5 10] [--skip-dice] [--skip-drop]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # tests/helpers/local_grid.py, the in-process federation the tests use

import yaml  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402

from client import client_app  # noqa: E402
from client.dp_ledger import SENSITIVITY_FACTOR  # noqa: E402
from common.config import FedsegConfig, load_config  # noqa: E402
from common.dp_accounting import gaussian_epsilon  # noqa: E402
from common.metrics_log import MetricsLog, read_events  # noqa: E402
from server.checkpoints import Checkpoints  # noqa: E402
from server.server_app import initial_weights  # noqa: E402
from server.strategy import FedSegStrategy  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402
from tests.helpers.local_grid import LocalGrid, federation  # noqa: E402

SPLIT_SEED = 6
"""Gives each 4-case synthetic site 3 training and 1 validation case (tests/helpers/hostile.py), so plain weights
are equal."""
DEFAULT_MODEL = [
    "model.in_channels=1",
    "model.out_channels=2",
    "data.patch_size=[16, 16, 16]",
    "train.local_steps=1",
    "train.batch_size=2",
    "train.hd95=false",
    "federation.cross_eval=false",
    f"data.split_seed={SPLIT_SEED}",
]
"""fedseg's default network (channels 16..256, batch norm kept at each site) on the synthetic sites' one channel."""
SMALL = [
    "model.channels=[8, 16, 32]",
    "model.strides=[2, 2]",
    "model.in_channels=1",
    "model.out_channels=2",
    "data.patch_size=[16, 16, 16]",
    "train.local_steps=15",
    "train.batch_size=2",
    "train.lr=0.003",
    "train.hd95=false",
    "federation.cross_eval=false",
    f"data.split_seed={SPLIT_SEED}",
]
"""benchmarks/bench_dp.py's setting, whose plain run reaches a mean Dice of about 0.7 in 4 rounds."""
SECAGG = ["federation.secure_aggregation=secagg+", "federation.norm_bound=0"]
PLAIN = ["federation.norm_bound=0"]
BENCH_TIMEOUT_S = 20.0
LOCAL_DP_CLIP = 2.0
"""benchmarks/bench_dp.py's clipping norm: just above the honest update norms of the small setting."""
LOCAL_DP_NOISE = [0.001, 0.01, 1.0]
DELTA = 1e-5
MB = 1e6


def closing_evaluation(rnd: int, msg: Message) -> bool:
    """The run's closing evaluation message: the same in both modes, so the cost runs do not deliver it."""
    return msg.metadata.message_type == MessageType.EVALUATE


def wire_bytes(msg: Message) -> int:
    """Bytes of a message as Flower moves it: every object deflated."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class CountedApp:
    """The ClientApp as the grid calls it: bytes of each message and reply that cross, and the site's seconds,
    by round and message type. The round is the one the strategy last configured (``follow``): a message that
    went over the wire in this grid has no group id left to tell."""

    def __init__(self) -> None:
        self.round = 0
        self.down: Counter[tuple[int, str]] = Counter()
        self.up: Counter[tuple[int, str]] = Counter()
        self.count: Counter[tuple[int, str]] = Counter()
        self.seconds: defaultdict[tuple[int, str], float] = defaultdict(float)

    def __call__(self, msg: Message, context) -> Message:
        key = (self.round, msg.metadata.message_type)
        self.down[key] += wire_bytes(msg)
        self.count[key] += 1
        started = time.perf_counter()
        reply = client_app.app(msg, context)
        self.seconds[key] += time.perf_counter() - started
        self.up[key] += wire_bytes(reply)
        return reply

    def follow(self, strategy: FedSegStrategy) -> None:
        """Take the round from the strategy's ``configure_train``, which opens every round's exchanges."""
        configure = strategy.configure_train

        def configure_train(server_round: int, *args, **kwargs):
            self.round = server_round
            return configure(server_round, *args, **kwargs)

        vars(strategy)["configure_train"] = configure_train  # an instance attribute shadows the method

    def round_total(self, counter: Mapping[tuple[int, str], float], rnd: int) -> float:
        """A round's total over its message types, without the run's closing evaluation message."""
        return sum(v for (r, kind), v in counter.items() if r == rnd and kind != MessageType.EVALUATE)


class TimedMasking:
    """Wraps client/secagg.py's ``masked_update`` (clip, quantize, mask) to add up its seconds."""

    def __init__(self) -> None:
        from client import secagg

        self.module, self.inner, self.seconds = secagg, secagg.masked_update, 0.0
        secagg.masked_update = self

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def close(self) -> None:
        self.module.masked_update = self.inner


class DroppingGrid(LocalGrid):
    """LocalGrid whose chosen messages never reach their site, as if it had gone: no reply ever comes."""

    def __init__(self, cfg: FedsegConfig, app: CountedApp, gone: Callable[[int, Message], bool]) -> None:
        super().__init__(cfg, app)
        self.counted = app
        self._gone = gone

    def gone(self, msg: Message) -> bool:
        return self._gone(self.counted.round, msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kept = [m for m in messages if not self.gone(m)]
        if any(m.metadata.message_type != MessageType.EVALUATE for m in messages if self.gone(m)) and timeout:
            time.sleep(timeout)  # Flower's grid waits this long for a reply that never comes
        return super().send_and_receive(kept, timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        gone = [m.object_id for m in messages if self.gone(m)]
        return [*super().push_messages([m for m in messages if not self.gone(m)]), *gone]  # pushed, never answered


def run(
    name: str,
    sites: int,
    rounds: int,
    settings: list[str],
    work: Path,
    gone: Callable[[int, Message], bool] = lambda rnd, m: False,
    site: dict | None = None,
) -> dict:
    """One federation of ``sites`` synthetic sites for ``rounds`` rounds; its metrics log and the bytes moved.

    ``site``: settings every site's own site.yaml adds (local DP), as ``simulation.sites.<name>.site_yaml``.
    """
    data = generate_federation(work / f"data-{sites}", n_sites=sites, n_cases=4, shape=(32, 32, 24), seed=0)
    if site:
        own = work / f"{name}-site.yaml"
        own.write_text(yaml.safe_dump({"site": {"min_cohort": 1, **site}}))  # synthetic cases: no cohort floor
        settings = [
            *settings,
            *(
                f"simulation.sites.{n}.{k}={v}"
                for n, d in data.items()
                for k, v in (("data_dir", d), ("site_yaml", own))
            ),
        ]
    name = name.replace("+", "plus")  # a run's name names folders: letters, digits, '.', '_' or '-'
    cfg = federation(
        load_config(
            None,
            [
                *settings,
                f"federation.rounds={rounds}",
                f"federation.min_sites={sites - 1}",
                f"federation.round_timeout_s={BENCH_TIMEOUT_S}",
                f"federation.runs_dir={work / 'runs'}",
                f"federation.run_name={name}",
            ],
        ),
        data,
    )
    weights, signature = initial_weights(cfg)
    counted, masking = CountedApp(), TimedMasking()
    grid = DroppingGrid(cfg, counted, gone)
    out = Path(cfg.federation.runs_dir) / cfg.federation.run_name
    strategy = FedSegStrategy(
        cfg,
        signature,
        {k: tuple(v.shape) for k, v in weights.items()},
        MetricsLog(out),
        Checkpoints(out / "checkpoints"),
    )
    counted.follow(strategy)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(weights),
            num_rounds=rounds,
            timeout=BENCH_TIMEOUT_S,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
    finally:
        masking.close()
    events = list(read_events(out / "metrics.jsonl"))
    return {
        "rounds": {e["round"]: e for e in events if e["event"] == "round"},
        "events": events,
        "counted": counted,
        "masking_s": masking.seconds,
    }


HEADER = (
    f"{'mode':<8} {'sites':>5} {'down MB':>8} {'up MB':>8} {'msgs':>5} {'site s':>7} {'mask s':>7} "
    f"{'centre s':>8} {'round s':>8} {'sites ok':>8}"
)


def _cost_row(mode: str, sites: int, r: dict, rnd: int = 2) -> str:
    """Round ``rnd``: bytes both ways, messages, a site's mean seconds (all its messages; of which masking,
    counted over the whole run and shared out per round), the centre's aggregation, the round's duration in the
    metrics log (the sites in turn, and any wait for a site that is gone); then the kilobytes and a site's
    seconds of each message type other than training."""
    c, summary = r["counted"], r["rounds"][rnd]
    site_s = c.round_total(c.seconds, rnd)
    rounds = len(r["rounds"])
    extra = sorted(
        {kind for (k, kind) in c.count if k == rnd and kind not in (MessageType.TRAIN, MessageType.EVALUATE)}
    )
    detail = ", ".join(
        f"{kind.removeprefix('query.')} {(c.down[rnd, kind] + c.up[rnd, kind]) / 1e3:.1f} kB "
        f"{c.seconds[rnd, kind] / sites:.2f} s"
        for kind in extra
    )
    return (
        f"{mode:<8} {sites:>5} {c.round_total(c.down, rnd) / MB:>8.2f} {c.round_total(c.up, rnd) / MB:>8.2f} "
        f"{int(c.round_total(c.count, rnd)):>5} {site_s / sites:>7.2f} {r['masking_s'] / rounds / sites:>7.2f} "
        f"{summary['aggregation_s']:>8.2f} {summary['duration_s']:>8.1f} {summary['sites_ok']:>8}"
        + (f"   {detail}" if detail else "")
    )


def part_cost(sites: list[int], modes: list[tuple[str, list[str]]], work: Path) -> None:
    print("Part 1: default model, round 2 of 2, sites in turn in one process (tiny local training)")
    print(HEADER)
    for n in sites:
        for mode, settings in modes:
            r = run(f"cost-{mode}-{n}", n, 2, [*DEFAULT_MODEL, *settings], work, gone=closing_evaluation)
            print(_cost_row(mode, n, r), flush=True)


def part_dice(work: Path, rounds: int = 4) -> None:
    print(
        f"\nPart 2: Dice at equal settings, small model, 3 sites, {rounds} rounds, one seed; local DP at every site "
        f"with clipping norm {LOCAL_DP_CLIP:g}"
    )
    print(f"{'mode':<8} {'local DP z':>10} {'epsilon':>9} {'final Dice':>11}  Dice per round")
    cases = [
        ("plain", PLAIN, 0.0),
        ("secagg+", SECAGG, 0.0),
        *(("plain", PLAIN, z) for z in LOCAL_DP_NOISE),
        ("secagg+", SECAGG, LOCAL_DP_NOISE[0]),
    ]
    for mode, settings, z in cases:
        local = {"local_dp_noise_multiplier": z, "local_dp_clipping_norm": LOCAL_DP_CLIP} if z else None
        r = run(f"dice-{mode}-{z:g}", 3, rounds, [*SMALL, *settings], work, site=local)
        dice = [r["rounds"][k]["dice_mean"] for k in sorted(r["rounds"])]
        counts = sorted({e["num_examples"] for e in r["events"] if e["event"] == "train" and e["num_examples"]})
        epsilon = f"{gaussian_epsilon(z / SENSITIVITY_FACTOR, rounds, DELTA):.3g}" if z else "-"
        print(
            f"{mode:<8} {z or '-':>10} {epsilon:>9} {dice[-1]:>11.4f}  {' '.join(f'{d:.4f}' for d in dice)}"
            + (f"   training cases per site {counts}" if counts else ""),
            flush=True,
        )


def part_drop(work: Path, sites: int = 5, victim: int = 2) -> None:
    from common import secagg

    def dropping(message_type: str) -> Callable[[int, Message], bool]:
        return lambda rnd, m: (
            closing_evaluation(rnd, m)
            or (rnd == 2 and m.metadata.dst_node_id == victim and m.metadata.message_type == message_type)
        )

    print(
        f"\nPart 3: default model, {sites} sites, site-{victim} drops in round 2 of 2 (round timeout "
        f"{BENCH_TIMEOUT_S:g} s)"
    )
    print(f"{HEADER}  drop")
    cases = [
        ("plain", PLAIN, None, "none"),
        ("plain", PLAIN, MessageType.TRAIN, "before its update"),
        ("secagg+", SECAGG, None, "none"),
        ("secagg+", SECAGG, MessageType.TRAIN, "before its masked update"),
        ("secagg+", SECAGG, secagg.UNMASK_QUERY, "after its masked update"),
    ]
    for mode, settings, message_type, said in cases:
        gone = dropping(message_type) if message_type else closing_evaluation
        r = run(f"drop-{mode}-{said.replace(' ', '-')}", sites, 2, [*DEFAULT_MODEL, *settings], work, gone)
        print(f"{_cost_row(mode, sites, r)}  {said}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--plain-only", action="store_true", help="Part 1 without secure aggregation only.")
    parser.add_argument("--skip-dice", action="store_true")
    parser.add_argument("--skip-drop", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedseg-secagg-") as tmp:
        work = Path(tmp)
        if not args.skip_cost:
            modes = [("plain", PLAIN)] if args.plain_only else [("plain", PLAIN), ("secagg+", SECAGG)]
            part_cost(args.sites, modes, work)
        if not args.skip_dice:
            part_dice(work)
        if not args.skip_drop:
            part_drop(work)


if __name__ == "__main__":
    main()
