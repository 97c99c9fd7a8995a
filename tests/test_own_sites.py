"""The user's own sites in the simulation: test sets, a held-out site, channels from dataset.json, pictures.

The small sites of tests/helpers/own_sites.py: one nnU-Net raw with
imagesTs/labelsTs, one Decathlon layout with labelled "test" entries, one of
DICOM series (test_dicom asserts what is DICOM about it), one held out. One
`fedseg-sim run` (``own_run``, tests/conftest.py, shared with test_cross_eval
and test_dicom) serves every assertion about the federated side;
`fedseg-sim compare --quick` runs the two baselines on the same sites.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from common import keys
from common.config import ConfigError, load_config
from common.dataset import read_dataset
from common.files import read_jsonl
from common.metrics_log import read_events
from common.runs import CROSS_EVAL_FILE, EGRESS_FILE
from simulations.cli import main as sim_main
from simulations.compare_run import federated_result
from simulations.sites import read_site_specs, with_data_channels
from tests.helpers.nifti_cases import nnunet_dataset
from tests.helpers.own_sites import TEST_CASES, TRAIN_CASES, site_yaml_of

TRAINING = ["dicom", "north", "south"]
"""The own sites that train: north and south hold test sets, dicom's scans are DICOM series; east is held out."""


def test_layouts_expose_their_test_sets(own_sites):
    _, folders = own_sites
    for name in ("north", "south"):
        spec = read_dataset(folders[name])
        assert (len(spec.cases), len(spec.test_cases), spec.unpaired) == (TRAIN_CASES, TEST_CASES, ())
    assert read_dataset(folders["south"]).layout == "msd"


@pytest.mark.simulation
def test_run_on_own_sites_scores_test_sets_and_the_held_out_site_on_everything(own_run):
    events = list(read_events(own_run / "metrics.jsonl"))
    assert sorted(events[0]["sites"]) == TRAINING and events[-1]["status"] == "completed"
    assert sorted({e["site"] for e in events if e["event"] == "train"}) == TRAINING
    cells = json.loads((own_run / CROSS_EVAL_FILE).read_text())["cells"]
    last = {c["site"]: c for c in cells if c["model"].startswith("last")}
    for name in ("north", "south"):
        cell = last[name]
        assert cell["trained"] and cell["test_num_examples"] == TEST_CASES and 0.0 <= cell["test_dice"] <= 1.0
        assert len(cell["test_dice_per_class"]) == 1 and len(cell["dice_per_class"]) == 1
        assert cell["num_examples"] == 1  # validation cases only
    east = last["east"]
    assert not east["trained"] and east["test_dice"] is None and east["dice_adapted"] is not None
    assert east["num_examples"] == TRAIN_CASES + TEST_CASES  # all its labelled cases
    result = federated_result(own_run)
    assert set(result["test_per_site"]) == {"north", "south"} and set(result["held_out"]) == {"east"}
    assert result["test_per_class"]["north"] == [last["north"]["test_dice"]]
    # the rounds (which choose the best checkpoint) saw the validation case only, never a test case
    assert {e["num_examples"] for e in events if e["event"] == "evaluate"} == {1}


@pytest.mark.simulation
def test_channels_come_from_dataset_json(own_run):
    snapshot = yaml.safe_load((own_run / "config.yaml").read_text())
    assert (snapshot["model"]["in_channels"], snapshot["model"]["out_channels"]) == (1, 2)


@pytest.mark.simulation
def test_pictures_stay_at_each_site_and_nothing_image_like_left(own_run):
    for name in ("north", "south", "east"):
        (picture,) = (own_run / "sites" / name / "report").glob("*.png")
        pixels = np.asarray(Image.open(picture).convert("RGB"))
        assert pixels.shape[0] > 200 and pixels.std() > 10
        width = pixels.shape[1]
        tinted = pixels[..., 0].astype(int) - pixels[..., 1] > 50  # the class-1 overlay over a grey scan
        assert not tinted[:, : width // 3].any(), "the left panel is the bare scan"
        assert tinted[:, width // 3 : 2 * width // 3].sum() > 20, "the ground truth is drawn in the middle panel"
        for line in read_events(own_run / "sites" / name / EGRESS_FILE):
            assert line["status"] == "sent" and set(line["keys"]) <= {
                keys.ARRAYS,
                keys.METRICS,
                keys.IDENTITY,
                keys.FINGERPRINT,
                keys.EVALUATION,
            }
            assert not any(k.endswith(".png") or "image" in k for ks in line["keys"].values() for k in ks)
    assert {p.relative_to(own_run).parts[::2] for p in own_run.rglob("*.png")} == {("sites", "report")}


@pytest.mark.simulation
def test_site_side_report_command(own_run, tmp_path, capsys):
    from client.cli import main as client_main

    site_yaml = site_yaml_of(own_run, "north")
    out = tmp_path / "pictures"
    assert (
        client_main(["report", "--config", str(site_yaml), "--run", str(own_run), "--out", str(out), "--cases", "1"])
        == 0
    )
    (picture,) = out.glob("north-*.png")
    said = capsys.readouterr().out
    assert "stay at this site" in said and "re-estimated" not in said and picture.stat().st_size > 5000
    held_out = site_yaml_of(own_run, "east")  # east never trained: its BatchNorm statistics are adapted first
    assert client_main(["report", "--config", str(held_out), "--run", str(own_run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "site east never trained in this run: re-estimated the BatchNorm statistics" in said
    assert list(out.glob("east-*.png"))


@pytest.mark.simulation
def test_compare_quick_on_own_sites(own_sites, tmp_path):
    config, _ = own_sites
    out = tmp_path / "cmp"
    assert (
        sim_main(["compare", "--quick", "--config", str(config), "--methods", "local", "pooled", "--out", str(out)])
        == 0
    )
    rows = {r["method"]: r for r in read_jsonl(out / "results.jsonl")}
    for row in rows.values():
        assert row["status"] == "ok" and sorted(row["per_site"]) == TRAINING
        assert set(row["test_per_site"]) == {"north", "south"} and all(
            len(v) == 1 for v in row["test_per_class"].values()
        )
    assert set(rows["pooled"]["held_out"]) == {"east"}
    report = (out / "results.md").read_text()
    assert "(3 training sites, 1 held out, your own datasets from simulation.sites)" in report
    assert "synthetic" not in report and "shift strength" not in report


def _channel_specs(tmp_path, **channels):
    return read_site_specs(
        {name: nnunet_dataset(tmp_path / name, n_cases=2, channels=ch) for name, ch in channels.items()}
    )


def test_sites_that_disagree_on_channels_are_named(tmp_path):
    specs = _channel_specs(tmp_path, a=("CT",), b=("CT",), c=("CT", "PET"))
    with pytest.raises(ConfigError, match=r"site 'c' declares 2 channels .* site 'a' declares 1"):
        with_data_channels(load_config(), specs)
    labels = tmp_path / "b" / "dataset.json"
    meta = json.loads(labels.read_text())
    meta["labels"] = {"background": 0, "lesion": 1, "edema": 2}
    labels.write_text(json.dumps(meta))
    specs = read_site_specs({"a": tmp_path / "a", "b": tmp_path / "b"})
    with pytest.raises(ConfigError, match=r"site 'b' declares 3 classes"):
        with_data_channels(load_config(), specs)


def test_explicit_channels_must_agree_with_the_data(tmp_path):
    specs = _channel_specs(tmp_path, a=("CT", "PET"), b=("CT", "PET"))
    resolved = with_data_channels(load_config(), specs)
    assert (resolved.model.in_channels, resolved.model.out_channels) == (2, 2)
    assert with_data_channels(load_config(None, ["model.in_channels=2"]), specs).model.in_channels == 2
    with pytest.raises(ConfigError, match=r"model.in_channels is 3 but the sites' dataset.json declare 2"):
        with_data_channels(load_config(None, ["model.in_channels=3"]), specs)


def test_sim_run_refuses_disagreeing_sites_before_starting(tmp_path, capsys):
    specs = {"a": ("CT",), "b": ("CT", "PET")}
    sites = {n: {"data_dir": str(nnunet_dataset(tmp_path / n, n_cases=2, channels=c))} for n, c in specs.items()}
    config = tmp_path / "sites.yaml"
    config.write_text(yaml.safe_dump({"simulation": {"sites": sites}, "federation": {"runs_dir": str(tmp_path)}}))
    assert sim_main(["run", "--config", str(config)]) == 2
    assert "site 'b' declares 2 channels" in capsys.readouterr().err
    assert not list(tmp_path.glob("sim-*"))


def test_synthetic_sites_can_carry_test_sets(tmp_path):
    from simulations.runner import prepare_run
    from simulations.sites import site_datasets

    cfg = prepare_run(
        load_config(
            None,
            [
                "simulation.num_sites=2",
                "simulation.cases_per_site=2",
                "simulation.test_cases_per_site=1",
                "simulation.volume_shape=[32, 32, 24]",
                f"simulation.data_dir={tmp_path}",
                f"federation.runs_dir={tmp_path}",
            ],
        )
    )
    specs = read_site_specs(site_datasets(cfg))
    assert list(specs) == ["site-1", "site-2"] == cfg.federation.sites
    assert all((len(s.cases), len(s.test_cases), s.unpaired) == (2, 1, ()) for s in specs.values())
