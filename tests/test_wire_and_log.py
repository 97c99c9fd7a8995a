"""The wire format and the metrics log at the byte level."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common import keys
from common.metrics_log import MetricsLog, read_events
from common.wire import WireError, error_reason, from_wire, pack, site_of_error, to_wire, unpack


def test_float16_on_the_wire_halves_bytes_and_returns_float32():
    tensors = {"w": torch.randn(64, 64), "steps": torch.tensor([3], dtype=torch.int64)}
    full, half = to_wire(tensors, "float32"), to_wire(tensors, "float16")
    assert half.count_bytes() < 0.55 * full.count_bytes()
    back = from_wire(half)
    assert back["w"].dtype == torch.float32 and back["steps"].dtype == torch.int64
    assert torch.allclose(back["w"], tensors["w"], atol=1e-2)


def _packed_model() -> tuple[dict[str, torch.Tensor], RecordDict]:
    tensors = {"enc.conv.weight": torch.randn(8, 1, 3, 3, 3), "enc.conv.bias": torch.randn(8),
               "scale": torch.tensor(2.0), "steps": torch.tensor([3], dtype=torch.int64)}
    content = RecordDict({keys.ARRAYS: to_wire(tensors, "float16"), keys.CONFIG: ConfigRecord({"round": 1})})
    return tensors, pack(content)


def _flower_objects(obj) -> int:
    """How many objects Flower pushes for ``obj``: in a deployment, one HTTPS request each."""
    return 1 + sum(_flower_objects(child) for child in (obj.children or {}).values())


def test_a_packed_message_is_a_few_flower_objects_and_unpacks_to_the_same_tensors():
    tensors, packed = _packed_model()
    assert sorted(packed[keys.ARRAYS].keys()) == ["packed-float16", "packed-int64"]
    back = unpack(packed)
    assert keys.LAYOUT not in back and back[keys.CONFIG]["round"] == 1
    # RecordDict, two ConfigRecords, the ArrayRecord, then an Array and its chunk per dtype, not per tensor
    assert _flower_objects(packed) == 4 + 2 * 2 and _flower_objects(back) == 3 + 2 * len(tensors)
    restored = from_wire(back[keys.ARRAYS])
    assert list(restored) == list(tensors)
    for name, value in tensors.items():
        assert restored[name].shape == value.shape
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(restored[name], expected)
    unpacked = RecordDict({keys.ARRAYS: to_wire(tensors)})
    assert unpack(unpacked) is unpacked  # an unpacked message passes as it is


@pytest.mark.parametrize("field, value", [
    ("shapes", [8, 1, 3, 3, 3, 9, 1]),          # one value more than sent
    ("shapes", [8, 1, 3, 3, 3, 7, 1]),          # one value less
    ("names", ["a", "a", "b", "c"]),            # a repeated name
    ("dtypes", ["float16", "float16", "object", "int64"]),
    ("ndims", [5, 1, 0]),                       # lists of different lengths
    ("shapes", [8, 1, 3, 3, 3, -8, 1]),         # a negative size
    ("names", "enc"),                           # not a list
])
def test_a_layout_that_lies_is_refused_whole(field, value):
    _, packed = _packed_model()
    packed[keys.LAYOUT][field] = value
    with pytest.raises(WireError):
        unpack(packed)


def test_packed_arrays_that_disagree_with_the_layout_are_refused():
    _, packed = _packed_model()
    packed[keys.ARRAYS] = ArrayRecord({"packed-float16": Array(np.zeros(10, np.float16)),
                                       "packed-int64": Array(np.zeros(1, np.int64))})
    with pytest.raises(WireError):
        unpack(packed)
    _, packed = _packed_model()
    packed[keys.ARRAYS] = ArrayRecord({"packed-float32": Array(np.zeros(225, np.float32)),
                                       "packed-int64": Array(np.zeros(1, np.int64))})
    with pytest.raises(WireError):
        unpack(packed)


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
