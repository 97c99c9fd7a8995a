"""Cyclic weight transfer: one training site per round, in turn, and its weights become the model.

One real simulation (Flower's engine, on a Ray cluster started apart: ``cyclic_run``,
tests/helpers/ray_head.py, shared with test_ray_cluster): two training sites and
one held out, quorum two, four rounds. Each round must train exactly one site, the two
alternating, without a quorum failure; the held-out site never trains; the
last round's evaluation reaches both training sites, and only that round,
scored by every site, may become the best model.
"""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from common.metrics_log import read_events
from common.runs import METRICS_FILE
from tests.helpers.ray_head import CYCLIC_ROUNDS as ROUNDS
from tests.helpers.tiny import tiny


@pytest.mark.simulation
def test_each_round_trains_the_next_site_in_turn(cyclic_run):
    log = cyclic_run.events
    trained = [(e["round"], e["site"]) for e in log if e["event"] == "train"]
    assert [r for r, _ in trained] == list(range(1, ROUNDS + 1))
    turns = [s for _, s in trained]
    assert set(turns) == {"site-1", "site-2"} and all(a != b for a, b in zip(turns, turns[1:], strict=False)), turns
    rounds = [e for e in log if e["event"] == "round"]
    assert [(e["sites_ok"], e["aggregated"]) for e in rounds] == [(1, True)] * ROUNDS
    assert not [e for e in log if e["event"] == "quorum-failure"]
    assert {e["site"] for e in log if e["event"] == "evaluate" and e["round"] == ROUNDS} == {"site-1", "site-2"}
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"
    assert log[-1]["best_round"] == ROUNDS, "one site's Dice ranked against another's"


@pytest.mark.parametrize(
    "setting",
    [
        "federation.server_optimizer=momentum",
        "federation.aggregator=median",
        "privacy.noise_multiplier=0.5",
        "federation.clip_updates=true",
    ],
)
def test_cyclic_refuses_what_needs_several_updates_a_round(setting):
    with pytest.raises(ConfigError, match="schedule: cyclic trains one site per round"):
        load_config(None, ["federation.schedule=cyclic", "federation.server_optimizer=none", setting])


# --- one huge update cannot stall the cycle (issue 21, L5) -------------------------------------------------------

HUGE = 1e12
"""A finite update factor (float32 holds it) that no site can train on afterwards."""


def _cyclic_run(tmp_path, tamper, *overrides: str, rounds: int = 4) -> list[dict]:
    """A cyclic run of the real strategy and the real ClientApp over Flower's wire (tests/helpers/local_grid.py);
    ``tamper(round, node, reply)`` may replace a site's training reply after it left the site."""
    from flwr.app import ArrayRecord, ConfigRecord

    from client import client_app
    from simulations.synthetic import generate_federation
    from tests.helpers.local_grid import LocalGrid, federation, model_strategy

    datasets = generate_federation(tmp_path / "data", n_sites=2, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    cfg = federation(
        load_config(
            None,
            [
                *tiny(
                    "model.norm=instance",
                    "federation.schedule=cyclic",
                    "federation.server_optimizer=none",
                    f"federation.rounds={rounds}",
                    "federation.min_sites=1",
                    "simulation.cpus_per_site=1",
                    *overrides,
                ),
                f"federation.runs_dir={tmp_path / 'runs'}",
                "federation.run_name=cycle",
            ],
        ),
        datasets,
    )
    run = tmp_path / "runs" / "cycle"
    strategy, weights = model_strategy(cfg, run)
    state = {"round": 0, "start": None}

    def hostile(node, reply):
        if reply.metadata.message_type == "train" and reply.has_content():
            return tamper(state["round"], reply, state["start"])
        return reply

    grid = LocalGrid(cfg, client_app.app, tamper=hostile)
    configure = strategy.configure_train

    def counting(server_round, arrays, config, grid):
        state["round"], state["start"] = server_round, arrays
        return configure(server_round, arrays, config, grid)

    vars(strategy)["configure_train"] = counting  # an instance attribute shadows the method
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(weights),
        num_rounds=rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    return list(read_events(run / METRICS_FILE))


@pytest.mark.simulation
def test_one_huge_update_does_not_stall_the_cycle(tmp_path):
    """Round 1's site sends a finite update 10^12 times its own: before, it became the model, no site could train
    on it, every later round was skipped and the model kept, for good."""
    from tests.helpers.hostile import scaled_update

    log = _cyclic_run(tmp_path, lambda rnd, reply, start: scaled_update(reply, start, HUGE) if rnd == 1 else reply)
    failed = [(e["round"], e["reason"]) for e in log if e["event"] == "failure"]
    assert [r for r, _ in failed] == [1] and "update norm" in failed[0][1], failed
    rounds = {e["round"]: e for e in log if e["event"] == "round"}
    assert [rounds[r]["sites_ok"] for r in (2, 3, 4)] == [1, 1, 1], "the cycle stalled after the huge update"


@pytest.mark.simulation
def test_a_round_whose_site_cannot_train_goes_back_to_the_last_model_a_site_trained_on(tmp_path):
    """With the norm bound off the huge update becomes the model; the next site cannot train on it, so that round
    goes back to the model round 1's site trained on, and the cycle goes on from there."""
    import torch
    from safetensors.torch import load_file

    from tests.helpers.hostile import scaled_update

    log = _cyclic_run(
        tmp_path,
        lambda rnd, reply, start: scaled_update(reply, start, HUGE) if rnd == 1 else reply,
        "federation.norm_bound=0",
    )
    assert {e["round"] for e in log if e["event"] == "failure"} == {2}, "only the site given the huge model fails"
    rounds = {e["round"]: e for e in log if e["event"] == "round"}
    assert [rounds[r]["sites_ok"] for r in (3, 4)] == [1, 1], "the cycle stalled after the huge update"
    last = load_file(str(tmp_path / "runs" / "cycle" / "checkpoints" / "last.safetensors"))
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in last.values())
