"""The wire format and the metrics log at the byte level."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common import keys
from common.files import atomic_write_text
from common.metrics_log import EVENT, Event, MetricsLog, by_kind, read_events
from common.runs import NORM_ROUND_FILE, ROUND_CHECKPOINT, CheckpointName, parse_checkpoint_name, round_of_file
from common.wire import WireError, error_reason, from_wire, message_round, pack, site_of_error, to_wire, unpack
from tests.helpers.envelopes import incoming

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_float16_on_the_wire_halves_bytes_and_returns_float32():
    tensors = {"w": torch.randn(64, 64), "steps": torch.tensor([3], dtype=torch.int64)}
    full, half = to_wire(tensors, "float32"), to_wire(tensors, "float16")
    assert half.count_bytes() < 0.55 * full.count_bytes()
    back = from_wire(half)
    assert back["w"].dtype == torch.float32 and back["steps"].dtype == torch.int64
    assert torch.allclose(back["w"], tensors["w"], atol=1e-2)


def _packed_model() -> tuple[dict[str, torch.Tensor], RecordDict]:
    tensors = {
        "enc.conv.weight": torch.randn(8, 1, 3, 3, 3),
        "enc.conv.bias": torch.randn(8),
        "scale": torch.tensor(2.0),
        "steps": torch.tensor([3], dtype=torch.int64),
    }
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


@pytest.mark.parametrize(
    "field, value",
    [
        ("shapes", [8, 1, 3, 3, 3, 9, 1]),  # one value more than sent
        ("shapes", [8, 1, 3, 3, 3, 7, 1]),  # one value less
        ("names", ["a", "a", "b", "c"]),  # a repeated name
        ("dtypes", ["float16", "float16", "object", "int64"]),
        ("ndims", [5, 1, 0]),  # lists of different lengths
        ("shapes", [8, 1, 3, 3, 3, -8, 1]),  # a negative size
        ("names", "enc"),  # not a list
    ],
)
def test_a_layout_that_lies_is_refused_whole(field, value):
    _, packed = _packed_model()
    packed[keys.LAYOUT][field] = value
    with pytest.raises(WireError):
        unpack(packed)


def test_packed_arrays_that_disagree_with_the_layout_are_refused():
    _, packed = _packed_model()
    packed[keys.ARRAYS] = ArrayRecord(
        {"packed-float16": Array(np.zeros(10, np.float16)), "packed-int64": Array(np.zeros(1, np.int64))}
    )
    with pytest.raises(WireError):
        unpack(packed)
    _, packed = _packed_model()
    packed[keys.ARRAYS] = ArrayRecord(
        {"packed-float32": Array(np.zeros(225, np.float32)), "packed-int64": Array(np.zeros(1, np.int64))}
    )
    with pytest.raises(WireError):
        unpack(packed)


def test_error_reasons_carry_the_site_name_only_in_front():
    assert site_of_error(error_reason("site-2", "diverged")) == "site-2"
    assert site_of_error("Traceback (most recent call last): ...") is None
    assert site_of_error(None) is None


def test_log_lines_are_strict_json_and_a_torn_line_is_skipped(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(Event.EVALUATE, round=1, site="a", dice=float("nan"), dice_per_class=[float("inf"), 0.5])
    log.sync()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "rou')
    events = list(read_events(tmp_path / "metrics.jsonl"))
    assert len(events) == 1
    assert events[0]["dice"] is None and events[0]["dice_per_class"] == [None, 0.5]
    first = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert "NaN" not in first and json.loads(first)["site"] == "a"


def test_every_event_is_declared_once_documented_and_read_by_kind(tmp_path):
    documented = (DOCS / "metrics-log.md").read_text()
    assert [e for e in Event if f"| `{e}` |" not in documented] == []
    log = MetricsLog(tmp_path)
    with pytest.raises(ValueError):
        log.write("trian", round=1)  # a misspelt event is refused, not written where no reader looks
    log.write(Event.TRAIN, round=1, site="a")
    log.write(Event.ROUND, round=1)
    log.sync()
    assert [e["round"] for e in read_events(log.path, Event.ROUND)] == [1]
    kinds = by_kind(read_events(log.path))
    assert [e[EVENT] for e in kinds[Event.TRAIN]] == ["train"] and kinds[Event.FAILURE] == []


def test_one_checkpoint_name_grammar():
    assert parse_checkpoint_name("best") == CheckpointName("best") and parse_checkpoint_name("last").round is None
    assert parse_checkpoint_name("round-3") == parse_checkpoint_name("round-0003") == CheckpointName.of_round(3)
    assert parse_checkpoint_name("round-3").file == ROUND_CHECKPOINT.format(3) == "round-0003.safetensors"
    assert str(CheckpointName.of_round(12)) == "round-12"
    assert [parse_checkpoint_name(t) for t in ("round-", "Best", "runs/x/round-0003.safetensors", "round-3x")] == [
        None
    ] * 4
    assert round_of_file("round-0007.safetensors", NORM_ROUND_FILE) == 7
    assert [
        round_of_file(n, NORM_ROUND_FILE)
        for n in ("round-7.safetensors", ".round-0007.safetensors.1-2.tmp", "round-0007.json")
    ] == [None] * 3


def test_a_message_round_is_read_from_its_config_else_its_group():
    def message(config: dict, group: str) -> Message:
        return incoming(RecordDict({keys.CONFIG: ConfigRecord(config)}), "train", 2, server_round=group)

    assert message_round(message({keys.SERVER_ROUND: 4}, "9")) == 4
    assert message_round(message({}, "9")) == 9
    assert message_round(message({keys.SERVER_ROUND: "4"}, "")) is None
    assert message_round(message({}, "\u00b2")) is None  # '²'.isdigit(), but no round


def test_an_atomic_write_is_whole_and_owner_only_when_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "secret.json", "{}", private=True)
        atomic_write_text(tmp_path / "plain.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644
    with pytest.raises(ZeroDivisionError):
        from common.files import atomic_save

        atomic_save(tmp_path / "plain.json", lambda tmp: (tmp.write_text("half"), 1 / 0))
    assert (tmp_path / "plain.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.json",
        "secret.json",
    ]
