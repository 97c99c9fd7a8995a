"""Cyclic weight transfer: one training site per round, in turn, and its weights become the model.

One real simulation (Flower's engine on Ray): two training sites and one held
out, quorum two, four rounds. Each round must train exactly one site, the two
alternating, without a quorum failure; the held-out site never trains; the
last round's evaluation reaches both training sites, and only that round,
scored by every site, may become the best model.
"""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from common.metrics_log import read_events
from common.runs import METRICS_FILE
from simulations.runner import run_simulation
from tests.tiny import tiny

ROUNDS = 4
CYCLIC = tiny(
    "model.norm=instance", "federation.schedule=cyclic", "federation.server_optimizer=none",
    f"federation.rounds={ROUNDS}", "federation.min_sites=2", "train.adapt_norm_steps=2",
    "simulation.num_sites=2", "simulation.held_out_sites=1", "simulation.cases_per_site=4",
    "simulation.volume_shape=[32, 32, 24]", "simulation.ray_num_cpus=2", "simulation.cpus_per_site=1",
)


def test_each_round_trains_the_next_site_in_turn(tmp_path):
    cfg = load_config(None, [*CYCLIC, f"federation.runs_dir={tmp_path / 'runs'}",
                             f"simulation.data_dir={tmp_path / 'data'}", "federation.run_name=cyclic"])
    log = list(read_events(run_simulation(cfg, show=lambda line: None) / METRICS_FILE))
    trained = [(e["round"], e["site"]) for e in log if e["event"] == "train"]
    assert [r for r, _ in trained] == list(range(1, ROUNDS + 1))
    turns = [s for _, s in trained]
    assert set(turns) == {"site-1", "site-2"} and all(a != b for a, b in zip(turns, turns[1:])), turns
    rounds = [e for e in log if e["event"] == "round"]
    assert [(e["sites_ok"], e["aggregated"]) for e in rounds] == [(1, True)] * ROUNDS
    assert not [e for e in log if e["event"] == "quorum-failure"]
    assert {e["site"] for e in log if e["event"] == "evaluate" and e["round"] == ROUNDS} == {"site-1", "site-2"}
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"
    assert log[-1]["best_round"] == ROUNDS, "one site's Dice ranked against another's"


@pytest.mark.parametrize("setting", ["federation.server_optimizer=momentum", "federation.aggregator=median",
                                     "privacy.noise_multiplier=0.5", "federation.clip_updates=true"])
def test_cyclic_refuses_what_needs_several_updates_a_round(setting):
    with pytest.raises(ConfigError, match="schedule: cyclic trains one site per round"):
        load_config(None, ["federation.schedule=cyclic", "federation.server_optimizer=none", setting])
