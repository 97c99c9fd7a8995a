"""A real Flower simulation (SuperLink, simulation engine, Ray) of three tiny sites (``quorum_run``, shared
with test_tensorboard.py): the plain federation, no privacy option on.

One site's data is broken: the run must log its failures, keep going on the
quorum of the other two, and leave a metrics log, checkpoints and config
that follow docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from common.metrics_log import read_events
from common.params import run_model
from common.processes import descendants
from tests.helpers.deploy_harness import site_norm_files

pytestmark = pytest.mark.simulation

ROUNDS = 2
TRAIN_FIELDS = {"round", "site", "num_examples", "loss", "proximal_loss", "duration_s", "bytes_up", "bytes_down"}
EVAL_FIELDS = {"round", "site", "num_examples", "dice", "dice_per_class", "hd95", "loss"}
ROUND_FIELDS = {"round", "sites_ok", "sites_failed", "dice_mean", "dice_weighted", "duration_s", "bytes_total"}


@pytest.fixture(scope="module")
def finished_run(quorum_run):
    """The shared run of tests/conftest.py: three sites, site-3's data broken, two rounds."""
    cfg, run, lines = quorum_run
    return cfg, run, list(read_events(run / "metrics.jsonl")), lines


def test_metrics_log_follows_design(finished_run):
    _, run, events, _ = finished_run
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end"
    assert events[0]["sites"] == ["site-1", "site-2", "site-3"]
    assert events[-1]["status"] == "completed"
    for e in events:
        if e["event"] == "train":
            assert TRAIN_FIELDS <= e.keys()
        if e["event"] == "evaluate":
            assert EVAL_FIELDS <= e.keys() and 0.0 <= e["dice"] <= 1.0
    rounds = [e for e in events if e["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(ROUND_FIELDS <= r.keys() for r in rounds)


def test_failing_site_is_logged_and_the_quorum_carries_on(finished_run):
    _, _, events, lines = finished_run
    failures = [e for e in events if e["event"] == "failure"]
    assert {e["site"] for e in failures} == {"site-3"}
    assert {e["round"] for e in failures if e["stage"] == "train"} == set(range(1, ROUNDS + 1))
    assert all("/" not in e["reason"] for e in failures)
    rounds = [e for e in events if e["event"] == "round"]
    assert all(r["sites_ok"] == 2 and r["aggregated"] and r["sites_failed"] == ["site-3"] for r in rounds)
    trained = {(e["round"], e["site"]) for e in events if e["event"] == "train"}
    assert trained == {(r, s) for r in range(1, ROUNDS + 1) for s in ("site-1", "site-2")}
    assert any("FAILED" in line for line in lines), "the terminal shows the failure"


def test_checkpoints_hold_only_shared_tensors(finished_run):
    cfg, run, _, _ = finished_run
    _, split, _ = run_model(cfg)
    for name in ("round-0001", "round-0002", "last", "best"):
        tensors = load_file(run / "checkpoints" / f"{name}.safetensors")
        assert set(tensors) == set(split.travelling), name
    assert not set(tensors) & set(split.local)


def test_config_snapshot_and_site_state(finished_run):
    cfg, run, _, _ = finished_run
    snapshot = yaml.safe_load((run / "config.yaml").read_text())
    assert snapshot["federation"]["rounds"] == ROUNDS
    assert snapshot["model"]["channels"] == cfg.model.channels
    for site in ("site-1", "site-2"):  # each site keeps its norm tensors of every round, under this run's identity
        assert [p.name for p in site_norm_files(run / "sites" / site, run)] == [
            f"round-{r:04d}.safetensors" for r in range(1, ROUNDS + 1)
        ]


def test_nothing_keeps_running(finished_run):
    import os

    leftovers = descendants(os.getpid())
    assert leftovers == [], [
        Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in leftovers if Path(f"/proc/{p}/cmdline").exists()
    ]
