"""Server momentum (FedAvgM): the global model moves by the round's update plus beta times the previous move,
and the velocity is saved and restored through the checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.config import ConfigError, load_config
from server.checkpoints import Checkpoints
from server.server_opt import ServerMomentum, server_optimizer


def _record(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def test_momentum_carries_the_previous_rounds_update_into_the_next():
    opt = server_optimizer(
        load_config(None, ["federation.server_optimizer=momentum", "federation.server_momentum=0.5"]).federation
    )
    start = {"w": np.array([0.0, 1.0], np.float32)}
    first = opt.step(start, _record([0.5, 0.0])).to_numpy_ndarrays()[0]
    np.testing.assert_allclose(first, [0.5, 0.0], err_msg="the first round moves by its own update, as FedAvg")
    second = opt.step({"w": first}, _record([0.5, 0.0])).to_numpy_ndarrays()[0]
    np.testing.assert_allclose(
        second,
        [0.75, -0.5],
        rtol=1e-6,
        err_msg="a round whose sites agree with the model still moves by half the last update",
    )
    assert second.dtype == np.float32
    plain = ServerMomentum(beta=0.0)
    np.testing.assert_allclose(plain.step(start, _record([0.5, 0.0])).to_numpy_ndarrays()[0], [0.5, 0.0])
    np.testing.assert_allclose(
        plain.step({"w": np.array([0.5, 0.0], np.float32)}, _record([0.5, 0.0])).to_numpy_ndarrays()[0],
        [0.5, 0.0],
        err_msg="beta 0 is plain averaging",
    )
    with pytest.raises(ConfigError, match="server_momentum"):
        load_config(None, ["federation.server_momentum=1"])


def test_none_is_no_server_step():
    assert server_optimizer(load_config(None, ["federation.server_optimizer=none"]).federation) is None


def test_saved_velocity_continues_the_same_trajectory(tmp_path):
    """Through the checkpoint file, which keeps the tensors in another order than the model's."""
    shapes = {"w": (2,), "a": (3,)}
    straight, restarted = ServerMomentum(0.5), ServerMomentum(0.5)

    def model(w: list[float], a: list[float]) -> ArrayRecord:
        return ArrayRecord({"w": Array(np.asarray(w, np.float32)), "a": Array(np.asarray(a, np.float32))})

    def arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in record.items()}

    first = arrays(straight.step(arrays(model([0.0, 1.0], [0.0] * 3)), model([0.5, 0.0], [1.0] * 3)))
    straight.save(Checkpoints(tmp_path), 1)
    second = arrays(straight.step(first, model([1.0, -0.5], [2.0, 0.0, 1.0])))
    restarted.restore(Checkpoints(tmp_path), 1, shapes)
    resumed = arrays(restarted.step(first, model([1.0, -0.5], [2.0, 0.0, 1.0])))
    for key in second:
        np.testing.assert_allclose(resumed[key], second[key], rtol=1e-6)
    fresh = arrays(ServerMomentum(0.5).step(first, model([1.0, -0.5], [2.0, 0.0, 1.0])))
    assert not np.allclose(fresh["w"], second["w"]), "without the velocity the step differs"


@pytest.mark.parametrize(
    "saved, problem",
    [
        (None, "none saved"),
        ({"momentum/w": np.zeros(3, np.float32)}, "does not fit the model"),
        ({"momentum/w": np.array([np.nan, 0.0], np.float32)}, "NaN or Inf"),
        ({"v/w": np.zeros(2, np.float32)}, "does not fit the model"),  # FedAdam's moments of an older run
    ],
)
def test_a_velocity_that_cannot_continue_the_model_starts_from_zero(tmp_path, caplog, saved, problem):
    if saved is not None:
        Checkpoints(tmp_path).save_optimizer(1, saved)
    opt = ServerMomentum(0.5)
    opt.restore(Checkpoints(tmp_path), 1, {"w": (2,)})
    assert opt.velocity == {} and problem in caplog.text and "start again from zero" in caplog.text
