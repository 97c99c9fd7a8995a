"""The metrics log mirrored to TensorBoard: every scalar in the event files is a number the log holds, and every
number the log holds is there; live during a real simulation (``quorum_run``) and afterwards with
``fedseg-server report --tensorboard``. Read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.metrics_log import read_events
from common.runs import METRICS_FILE, TENSORBOARD_DIR
from server.cli import main as server_main
from server.tensorboard import write_mirror

FLOAT32 = 1e-6
"""TensorBoard keeps a scalar as float32: relative precision about 6e-8."""


def _read_back(folder: Path) -> list[tuple[str, int, float, float]]:
    """(tag, step, value, wall time) of every scalar in the folder's event files."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(tag, s.step, s.value, s.wall_time) for tag in acc.Tags()["scalars"] for s in acc.Scalars(tag)]


def _numbers(events: list[dict]) -> list[tuple[dict, str, int | None, float]]:
    """Every number of the log but the round (the step) and the time (the wall time): (event, field, index, value)."""
    out: list[tuple[dict, str, int | None, float]] = []
    for e in events:
        for name, value in e.items():
            if name in ("round", "time") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out.append((e, name, None, float(value)))
            elif isinstance(value, list):
                out += [
                    (e, name, i, float(v))
                    for i, v in enumerate(value)
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                ]
    return out


def _maps_onto(scalar: tuple[str, int, float, float], number: tuple[dict, str, int | None, float]) -> bool:
    """Whether a TensorBoard scalar is this number of the log: kind, field, round, value, the list index, and the
    rest of its tag the event's own text (its site, stage or model)."""
    tag, step, value, wall = scalar
    event, name, index, expected = number
    kind, field, *rest = tag.split("/")
    if index is not None:
        if not rest or rest[0] != str(index):
            return False
        rest = rest[1:]
    texts = {v for v in event.values() if isinstance(v, str)}
    return (
        kind == event["event"]
        and field == name
        and step == (event.get("round") or 0)
        and value == pytest.approx(expected, rel=FLOAT32, abs=1e-30)
        and wall == pytest.approx(event["time"], abs=1e-3)
        and all(part in texts for part in rest)
    )


def _assert_mirror(folder: Path, metrics: Path) -> None:
    scalars = _read_back(folder)
    numbers = _numbers(list(read_events(metrics)))
    assert scalars, f"no scalars in {folder}"
    unmatched = list(numbers)
    for scalar in scalars:
        match = next((n for n in unmatched if _maps_onto(scalar, n)), None)
        assert match is not None, f"{scalar} is no number of {metrics}"
        unmatched.remove(match)
    assert not unmatched, f"numbers of the log missing in TensorBoard: {[(n[0]['event'], n[1]) for n in unmatched]}"


@pytest.mark.simulation
def test_the_live_mirror_of_a_simulation_holds_the_log_and_nothing_else(quorum_run):
    _, run, _ = quorum_run
    folder = run / TENSORBOARD_DIR
    assert list(folder.glob("events.out.tfevents.*"))
    _assert_mirror(folder, run / METRICS_FILE)
    tags = {s[0] for s in _read_back(folder)}
    assert {"evaluate/dice/site-1", "round/dice_weighted", "train/loss/site-2"} <= tags


def test_the_privacy_budget_is_mirrored_as_privacy_epsilon(tmp_path):
    """The shared simulation runs without DP: the privacy event's mirror, from a log that holds one."""
    events = [
        {
            "event": "privacy",
            "round": 1,
            "time": 1.0,
            "epsilon": 0.7,
            "delta": 1e-5,
            "releases": 1,
            "noise_multiplier": 0.5,
            "clipping_norm": 2.0,
            "sites": 2,
            "denominator": 3,
            "noise_std": 0.33,
            "accountant": "gaussian",
        }
    ]
    folder = _mirror_of(events, tmp_path / "run")
    _assert_mirror(folder, tmp_path / "run" / METRICS_FILE)
    assert "privacy/epsilon" in {s[0] for s in _read_back(folder)}


@pytest.mark.simulation
def test_report_mirrors_a_finished_run_once(quorum_run, tmp_path, capsys):
    _, run, _ = quorum_run
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run / METRICS_FILE, copy / METRICS_FILE)
    assert server_main(["report", str(copy), "--tensorboard"]) == 0
    folder = copy / "report" / "tensorboard"
    _assert_mirror(folder, copy / METRICS_FILE)
    assert str(folder) in capsys.readouterr().out
    assert server_main(["report", str(copy), "--tensorboard", str(folder)]) == 2  # every number twice: refused
    assert "already holds TensorBoard event files" in capsys.readouterr().err
    assert server_main(["report", str(copy), "--tensorboard", str(tmp_path / "elsewhere")]) == 0
    _assert_mirror(tmp_path / "elsewhere", copy / METRICS_FILE)


def _mirror_of(events: list[dict], run: Path) -> Path:
    run.mkdir()
    (run / METRICS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
    return write_mirror(run, run / "tb")[0]


@pytest.mark.simulation
def test_the_check_fails_on_a_mirror_that_differs_from_its_log(quorum_run, tmp_path):
    """The checks above can fail: a mirror lacking the log's training lines, or with one loss changed."""
    _, run, _ = quorum_run
    events = list(read_events(run / METRICS_FILE))
    fewer = _mirror_of([e for e in events if e["event"] != "train"], tmp_path / "fewer")
    with pytest.raises(AssertionError, match="missing in TensorBoard"):
        _assert_mirror(fewer, run / METRICS_FILE)
    first_train = next(i for i, e in enumerate(events) if e["event"] == "train")
    changed = [dict(e, loss=e["loss"] + 1.0) if i == first_train else e for i, e in enumerate(events)]
    with pytest.raises(AssertionError, match="is no number of"):
        _assert_mirror(_mirror_of(changed, tmp_path / "changed"), run / METRICS_FILE)
