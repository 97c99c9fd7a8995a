"""The wire format and the metrics log at the byte level."""

from __future__ import annotations

import json

import torch

from common.metrics_log import MetricsLog, read_events
from common.wire import error_reason, from_wire, site_of_error, to_wire


def test_float16_on_the_wire_halves_bytes_and_returns_float32():
    tensors = {"w": torch.randn(64, 64), "steps": torch.tensor([3], dtype=torch.int64)}
    full, half = to_wire(tensors, "float32"), to_wire(tensors, "float16")
    assert half.count_bytes() < 0.55 * full.count_bytes()
    back = from_wire(half)
    assert back["w"].dtype == torch.float32 and back["steps"].dtype == torch.int64
    assert torch.allclose(back["w"], tensors["w"], atol=1e-2)


def test_error_reasons_carry_the_site_name_only_in_front():
    assert site_of_error(error_reason("site-2", "diverged")) == "site-2"
    assert site_of_error("Traceback (most recent call last): ...") is None
    assert site_of_error(None) is None


def test_log_lines_are_strict_json_and_a_torn_line_is_skipped(tmp_path):
    log = MetricsLog(tmp_path)
    log.write("evaluate", round=1, site="a", dice=float("nan"), dice_per_class=[float("inf"), 0.5])
    log.sync()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "rou')
    events = list(read_events(tmp_path / "metrics.jsonl"))
    assert len(events) == 1
    assert events[0]["dice"] is None and events[0]["dice_per_class"] == [None, 0.5]
    first = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert "NaN" not in first and json.loads(first)["site"] == "a"
