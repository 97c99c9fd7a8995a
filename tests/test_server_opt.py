"""Server-side FedAvgM / FedAdam / FedYogi: the global model moves by the optimiser's step on the round's aggregate."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, load_config
from server.checkpoints import Checkpoints
from server.server_opt import BETA_1, BETA_2, server_optimizer


def _record(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def test_fedadam_moves_by_adams_step_on_the_pseudo_gradient():
    cfg = load_config(None, ["federation.server_optimizer=adam", "federation.server_lr=0.1",
                             "federation.server_tau=0.001"]).federation
    opt = server_optimizer(cfg)
    start = {"w": np.array([0.0, 1.0], np.float32)}
    moved = opt.step(1, start, _record([0.5, 0.0])).to_numpy_ndarrays()[0]
    delta = np.array([0.5, -1.0])
    m, v = (1 - BETA_1) * delta, (1 - BETA_2) * delta ** 2
    eta = 0.1 * np.sqrt(1 - BETA_2 ** 2) / (1 - BETA_1 ** 2)
    assert moved.dtype == np.float32
    np.testing.assert_allclose(moved, start["w"] + eta * m / (np.sqrt(v) + 0.001), rtol=1e-5)
    assert moved[0] > 0 and moved[1] < 1, "the step follows the sign of the sites' update"
    second = opt.step(2, {"w": moved}, _record([0.5, 0.0])).to_numpy_ndarrays()[0]
    assert not np.allclose(second, moved), "the moments carry over to the next round"


def test_momentum_carries_the_previous_rounds_update_into_the_next():
    cfg = load_config(None, ["federation.server_optimizer=momentum", "federation.server_momentum=0.5"]).federation
    opt = server_optimizer(cfg)
    start = {"w": np.array([0.0, 1.0], np.float32)}
    first = opt.step(1, start, _record([0.5, 0.0])).to_numpy_ndarrays()[0]
    np.testing.assert_allclose(first, [0.5, 0.0], err_msg="the first round moves by its own update, as FedAvg")
    second = opt.step(2, {"w": first}, _record([0.5, 0.0])).to_numpy_ndarrays()[0]
    np.testing.assert_allclose(second, [0.75, -0.5], rtol=1e-6,
                               err_msg="a round whose sites agree with the model still moves by half the last update")
    assert second.dtype == np.float32
    plain = server_optimizer(load_config(None, ["federation.server_optimizer=momentum",
                                                "federation.server_momentum=0"]).federation)
    np.testing.assert_allclose(plain.step(1, start, _record([0.5, 0.0])).to_numpy_ndarrays()[0], [0.5, 0.0])
    np.testing.assert_allclose(plain.step(2, {"w": np.array([0.5, 0.0], np.float32)}, _record([0.5, 0.0]))
                               .to_numpy_ndarrays()[0], [0.5, 0.0], err_msg="beta 0 is plain averaging")
    with pytest.raises(ConfigError, match="server_momentum"):
        load_config(None, ["federation.server_momentum=1"])


def test_yogi_and_none_and_bad_values_are_checked():
    assert server_optimizer(load_config(None, ["federation.server_optimizer=none"]).federation) is None
    yogi = server_optimizer(load_config(None, ["federation.server_optimizer=yogi"]).federation)
    moved = yogi.step(1, {"w": np.zeros(2, np.float32)}, _record([1.0, -1.0])).to_numpy_ndarrays()[0]
    assert moved[0] > 0 > moved[1]
    with pytest.raises(ConfigError, match="server_lr"):
        load_config(None, ["federation.server_lr=0"])


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi"])
def test_saved_moments_continue_the_same_trajectory(kind, tmp_path):
    """Through the checkpoint file, which keeps the tensors in another order than the model's."""
    cfg = load_config(None, [f"federation.server_optimizer={kind}", "federation.server_lr=0.1"]).federation
    straight, restarted = server_optimizer(cfg), server_optimizer(cfg)

    def model(w: list[float], a: list[float]) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.asarray(w, np.float32)), "a": Array(np.asarray(a, np.float32))})

    def arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in record.items()}

    first = arrays(straight.step(1, arrays(model([0.0, 1.0], [0.0] * 3)), model([0.5, 0.0], [1.0] * 3)))
    Checkpoints(tmp_path).save_optimizer(1, straight.state())
    second = arrays(straight.step(2, first, model([1.0, -0.5], [2.0, 0.0, 1.0])))
    restarted.load_state(Checkpoints(tmp_path).optimizer(1))
    resumed = arrays(restarted.step(2, first, model([1.0, -0.5], [2.0, 0.0, 1.0])))
    for key in second:
        np.testing.assert_allclose(resumed[key], second[key], rtol=1e-6)
    fresh = arrays(server_optimizer(cfg).step(2, first, model([1.0, -0.5], [2.0, 0.0, 1.0])))
    assert not np.allclose(fresh["w"], second["w"]), "without the moments the step differs"
