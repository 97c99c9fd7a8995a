"""Robust aggregation: one hostile site of five does far less harm than with the plain mean.

The hostile site (site-5) sends the strongest update the norm bound lets
through: its honest update flipped in sign and stretched to 80% of the bound.
Measured on this tiny five-site benchmark (one validation case per site, so
Dice is noisy), the plain mean loses 0.2 to 0.77 mean Dice; the coordinate
median and trimmed mean lose 0.00 to 0.10, depending on which site is hostile
and on the run. The issue's target, a change under 0.02, is therefore NOT
reliably met against this attack, and these tests do not claim it: they
check that robust aggregation bounds the damage (< 0.1) and at least halves
what the plain mean suffers.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, load_config
from server import robust
from tests.hostile import scaled_update, trained_round

NORM_BOUND = 10.0
ATTACK_SHARE_OF_BOUND = 0.8
MAX_ROBUST_DICE_LOSS = 0.1
MIN_MEAN_DICE_LOSS = 0.1
"""The attack must visibly hurt the plain mean, or these tests prove nothing."""


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return trained_round(tmp_path_factory.getbasetemp() / "hostile")


@pytest.fixture(scope="module")
def attacked(fed):
    """The honest replies with site-5's replaced by a sign-flipped update just inside the bound."""
    *honest, victim = fed.honest
    norms = fed.norms()
    others = float(np.median(norms[:-1]))
    factor = -ATTACK_SHARE_OF_BOUND * NORM_BOUND * others / norms[-1]
    return [*honest, scaled_update(victim, fed.start, factor)]


@pytest.fixture(scope="module")
def mean_loss(fed, attacked) -> float:
    clean = fed.dice(fed.aggregate(fed.honest, name="mean-clean"))
    hostile = fed.dice(fed.aggregate(attacked, name="mean-hostile"))
    return clean - hostile


def test_the_attack_hurts_the_plain_mean(mean_loss):
    assert mean_loss > MIN_MEAN_DICE_LOSS, mean_loss


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_robust_aggregation_bounds_one_hostile_site_of_five(fed, attacked, mean_loss, aggregator):
    setting = f"federation.aggregator={aggregator}"
    clean = fed.dice(fed.aggregate(fed.honest, setting, name=f"{aggregator}-clean"))
    hostile = fed.dice(fed.aggregate(attacked, setting, name=f"{aggregator}-hostile"))
    change = abs(hostile - clean)
    assert change < MAX_ROBUST_DICE_LOSS and change < mean_loss / 2, (aggregator, clean, hostile, mean_loss)


# --- the aggregators' arithmetic --------------------------------------------------------


def _records(*values: float) -> list[ArrayRecord]:
    return [ArrayRecord({"w": Array(np.array([v, -v], np.float32)), "b": Array(np.array([v], np.float32))})
            for v in values]


def _run(aggregator: str, values, weights=None, trim: float = 0.2) -> np.ndarray:
    cfg = load_config(None, [f"federation.aggregator={aggregator}", f"federation.trim_fraction={trim}"]).federation
    weights = weights or [1.0] * len(values)
    return robust.aggregate(_records(*values), weights, cfg)["w"].numpy()


def test_mean_is_weighted_by_cases():
    assert np.allclose(_run("mean", [1.0, 4.0], [1.0, 3.0]), [3.25, -3.25])


def test_median_and_trimmed_mean_ignore_one_outlier_and_the_weights():
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    assert np.allclose(_run("median", values, [1, 1, 1, 1, 1e6]), [3.0, -3.0])
    assert np.allclose(_run("trimmed_mean", values, [1, 1, 1, 1, 1e6]), [3.0, -3.0])
    assert np.allclose(_run("median", [1.0, 2.0, 3.0, 100.0]), [2.5, -2.5])


def test_trimmed_mean_keeps_at_least_one_site():
    assert robust.trim_count(5, 0.2) == 1 and robust.trim_count(3, 0.2) == 0
    assert robust.trim_count(2, 0.49) == 0 and robust.trim_count(20, 0.45) == 9
    assert np.allclose(_run("trimmed_mean", [1.0, 2.0, 6.0]), [3.0, -3.0])


def test_aggregate_is_float32_in_key_order():
    out = robust.aggregate(_records(1.0, 2.0), [1.0, 1.0], load_config(None).federation)
    assert list(out) == ["w", "b"] and out["w"].numpy().dtype == np.float32


def test_invalid_settings_are_refused():
    with pytest.raises(ConfigError, match="trim_fraction"):
        load_config(None, ["federation.trim_fraction=0.5"])
    with pytest.raises(ConfigError, match="aggregator: mean"):
        load_config(None, ["federation.aggregator=median", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="norm_bound"):
        load_config(None, ["federation.norm_bound=0.5"])
