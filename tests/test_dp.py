"""Central differential privacy: Flower's clipping wrapper on fedseg's strategy, its budget, end to end.

The end-to-end test runs its own real simulation (Flower's simulation engine,
the same ServerApp and ClientApp as a deployment) with DP on and checks the
metrics log carries epsilon every round, and that every site's egress log
matches, hash for hash, what the server logged as received.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType
from safetensors.torch import load_file

from common import keys
from common.config import load_config
from common.dp_accounting import gaussian_delta, gaussian_epsilon
from common.files import read_jsonl
from common.metrics_log import MetricsLog, read_events
from common.runs import EGRESS_FILE
from server.checkpoints import Checkpoints
from server.dp import CentralDP
from server.strategy import FedSegStrategy
from tests.helpers.local_grid import LocalGrid
from tests.helpers.messages import train_reply

DELTA = 1e-5
SIZE = 20_000
"""Coordinates of the hand-made model: enough to measure the noise's std to a few percent."""


# --- the accountant -------------------------------------------------------------------


def test_epsilon_round_trips_through_the_privacy_profile():
    for z, releases in [(0.8, 1), (1.0, 10), (2.0, 50), (5.0, 3)]:
        eps = gaussian_epsilon(z, releases, DELTA)
        assert gaussian_delta(eps, math.sqrt(releases) / z) == pytest.approx(DELTA, rel=1e-6)


def test_epsilon_beats_the_classical_gaussian_bound():
    """sigma = sqrt(2 ln(1.25/delta)) / eps gives (eps, delta)-DP (Dwork & Roth, eps < 1); exact is tighter."""
    for eps_classical in (0.25, 0.5, 0.9):
        z = math.sqrt(2 * math.log(1.25 / DELTA)) / eps_classical
        assert gaussian_epsilon(z, 1, DELTA) < eps_classical


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    per_round = [gaussian_epsilon(1.0, t, DELTA) for t in range(1, 6)]
    assert per_round == sorted(per_round) and per_round[0] > 0
    assert gaussian_epsilon(2.0, 5, DELTA) < gaussian_epsilon(1.0, 5, DELTA)
    assert gaussian_epsilon(1.0, 0, DELTA) == 0.0
    assert math.isfinite(gaussian_epsilon(0.01, 100, DELTA))


# --- the DP step of fedseg's strategy, with hand-made replies ----------------------------


def _train_reply(node: int, site: str, update: np.ndarray, signature: str, n: int = 1) -> Message:
    """Site ``site`` sends ``update`` as the model's one array ``w``, claiming ``n`` cases."""
    arrays = ArrayRecord({"w": Array(update.astype(np.float32))})
    return train_reply(node, site, arrays=arrays, n=n, signature=signature)


def _dp_strategy(tmp_path, *overrides: str):
    cfg = load_config(
        None,
        [
            "federation.run_name=dp",
            f"federation.runs_dir={tmp_path}",
            "federation.min_sites=2",
            "privacy.noise_multiplier=1.0",
            "privacy.clipping_norm=1.0",
            *overrides,
        ],
    )
    cfg = cfg.replace(federation=cfg.federation.replace(sites=["a", "b", "c"]))
    log = MetricsLog(tmp_path)
    wrapper = FedSegStrategy(cfg, "sig", {"w": (SIZE,)}, log, Checkpoints(tmp_path / "ckpt"))
    assert isinstance(wrapper.privacy, CentralDP)
    grid = LocalGrid(cfg, app=None)
    return wrapper, grid, tmp_path


@pytest.fixture()
def dp(tmp_path):
    return _dp_strategy(tmp_path)


def test_updates_are_clipped_averaged_unweighted_and_noised(dp):
    wrapper, grid, run = dp
    start = np.zeros(SIZE, np.float32)
    wrapper.configure_train(1, ArrayRecord({"w": Array(start)}), ConfigRecord(), grid)
    direction = np.ones(SIZE, np.float32) / math.sqrt(SIZE)
    replies = [
        _train_reply(1, "a", start + 4.0 * direction, "sig", n=1),  # clipped to norm 1
        _train_reply(2, "b", start + 0.5 * direction, "sig", n=100),  # inside the clip, weight ignored
        _train_reply(3, "c", np.full(SIZE + 1, np.nan), "sig"),  # rejected before clipping
    ]
    arrays, _ = wrapper.aggregate_train(1, replies)
    noise = arrays["w"].numpy() - (1.0 + 0.5) / 3 * direction  # the rejected site counts as a zero update
    assert noise.std() == pytest.approx(1.0 * 1.0 / 3, rel=0.05)
    assert abs(noise.mean()) < 0.02
    events = list(read_events(run / "metrics.jsonl"))
    assert [e["site"] for e in events if e["event"] == "failure"] == ["c"]
    (privacy,) = [e for e in events if e["event"] == "privacy"]
    assert privacy["round"] == 1 and privacy["sites"] == 2 and privacy["releases"] == 1
    assert privacy["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1, DELTA))
    assert privacy["noise_std"] == pytest.approx(1 / 3) and privacy["denominator"] == 3
    saved = load_file(run / "ckpt" / "round-0001.safetensors")["w"].numpy()
    assert np.array_equal(saved, arrays["w"].numpy())


def test_server_momentum_steps_on_the_noised_mean_only(tmp_path):
    """The momentum must be built from released (noised) models, or it would carry un-noised updates
    into later releases."""
    wrapper, grid, run = _dp_strategy(
        tmp_path, "federation.server_optimizer=momentum", "federation.server_momentum=0.5"
    )
    direction = np.ones(SIZE, np.float32) / math.sqrt(SIZE)
    released = [np.zeros(SIZE, np.float32)]
    for rnd in (1, 2):
        start = released[-1]
        wrapper.configure_train(rnd, ArrayRecord({"w": Array(start)}), ConfigRecord(), grid)
        replies = [_train_reply(1, "a", start + direction, "sig"), _train_reply(2, "b", start + direction, "sig")]
        arrays, _ = wrapper.aggregate_train(rnd, replies)
        released.append(arrays["w"].numpy())
    first_move = released[1] - released[0]
    noise_1 = first_move - 2 / 3 * direction
    assert noise_1.std() == pytest.approx(1 / 3, rel=0.05), "round 1 moves by the noised mean itself"
    noise_2 = released[2] - released[1] - 0.5 * first_move - 2 / 3 * direction
    assert noise_2.std() == pytest.approx(1 / 3, rel=0.05), (
        "round 2 adds half of round 1's noised move to its own noised mean, and no other noise"
    )
    assert len([e for e in read_events(run / "metrics.jsonl") if e["event"] == "privacy"]) == 2


def test_an_untrained_reply_is_rejected_before_clipping(dp):
    wrapper, grid, run = dp
    start = np.zeros(SIZE, np.float32)
    wrapper.configure_train(1, ArrayRecord({"w": Array(start)}), ConfigRecord(), grid)
    replies = [
        _train_reply(1, "a", start + 0.1, "sig"),
        _train_reply(2, "b", start + 0.2, "sig"),
        _train_reply(3, "c", start, "sig"),
    ]
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert arrays is not None
    (failure,) = [e for e in read_events(run / "metrics.jsonl") if e["event"] == "failure"]
    assert failure["site"] == "c" and "exactly zero" in failure["reason"]


def test_only_the_travelling_arrays_are_touched(dp):
    wrapper, grid, _ = dp
    start = np.zeros(SIZE, np.float32)
    wrapper.configure_train(1, ArrayRecord({"w": Array(start)}), ConfigRecord(), grid)
    replies = [_train_reply(i, s, start + 0.1, "sig") for i, s in enumerate("ab", start=1)]
    before = [{name: dict(rec) for name, rec in r.content.items() if name != keys.ARRAYS} for r in replies]
    wrapper.aggregate_train(1, replies)
    after = [{name: dict(rec) for name, rec in r.content.items() if name != keys.ARRAYS} for r in replies]
    assert before == after
    assert all(list(r.content.array_records) == [keys.ARRAYS] for r in replies)


def test_budget_accumulates_over_released_rounds(dp):
    wrapper, grid, run = dp
    start = np.zeros(SIZE, np.float32)
    for rnd in (1, 2):
        wrapper.configure_train(rnd, ArrayRecord({"w": Array(start)}), ConfigRecord(), grid)
        wrapper.aggregate_train(rnd, [_train_reply(i, s, start + 0.1, "sig") for i, s in enumerate("ab", 1)])
    wrapper.configure_train(3, ArrayRecord({"w": Array(start)}), ConfigRecord(), grid)
    assert wrapper.aggregate_train(3, [_train_reply(1, "a", start + 0.1, "sig")]) == (None, None)  # below quorum
    eps = [e["epsilon"] for e in read_events(run / "metrics.jsonl") if e["event"] == "privacy"]
    assert eps == pytest.approx([gaussian_epsilon(1.0, 1, DELTA), gaussian_epsilon(1.0, 2, DELTA)])


# --- end to end in the simulation -----------------------------------------------------------


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """A real Flower simulation (SuperLink, simulation engine, Ray) with central DP on: two tiny sites, two rounds,
    privacy.noise_multiplier 0.5 and clipping 2.0."""
    from simulations.runner import run_simulation
    from tests.helpers.tiny import tiny

    root = tmp_path_factory.mktemp("dp-sim")
    cfg = load_config(
        None,
        tiny(
            "federation.run_name=dp-sim",
            f"federation.runs_dir={root / 'runs'}",
            "federation.rounds=2",
            "federation.min_sites=2",
            "federation.cross_eval=false",
            "simulation.num_sites=2",
            "simulation.cases_per_site=4",
            "simulation.volume_shape=[32, 32, 24]",
            "simulation.seed=1",
            f"simulation.data_dir={root / 'data'}",
            "simulation.cpus_per_site=1",
            "simulation.ray_num_cpus=2",
            "privacy.noise_multiplier=0.5",
            "privacy.clipping_norm=2.0",
        ),
    )
    return run_simulation(cfg, show=lambda line: None)


@pytest.mark.simulation
def test_dp_runs_end_to_end_in_the_simulation(dp_run):
    """Two sound sites, two rounds: an epsilon per release, and what each site sent is what the centre received."""
    run = dp_run
    events = list(read_events(run / "metrics.jsonl"))
    privacy = [e for e in events if e["event"] == "privacy"]
    assert [e["round"] for e in privacy] == [1, 2]
    assert privacy[0]["epsilon"] == pytest.approx(gaussian_epsilon(0.5, 1, DELTA))
    assert privacy[1]["epsilon"] > privacy[0]["epsilon"] > 0
    assert [e["status"] for e in events if e["event"] == "run-end"] == ["completed"]

    received = {(e["site"], e["round"]): e[keys.CONTENT_SHA256] for e in events if e["event"] == "train"}
    assert len(received) == 4
    for site in ("site-1", "site-2"):
        lines = list(read_jsonl(run / "sites" / site / EGRESS_FILE))
        sent = {
            (site, e["round"]): e[keys.CONTENT_SHA256]
            for e in lines
            if e["message_type"] == MessageType.TRAIN and e["status"] == "sent"
        }
        assert sent == {k: v for k, v in received.items() if k[0] == site}
        assert all(e["status"] == "sent" for e in lines)
    last = load_file(run / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values())
