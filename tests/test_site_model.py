"""The model a site keeps: export, predict from the folder alone, the README's snippet, and the audit trail."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import torch
import yaml

from client.cli import main
from client.site_model import load_site_model
from common.config import load_config
from common.files import read_jsonl
from common.model import build_model
from common.runs import EXPORT_LOG, README_FILE
from tests.helpers.run_folders import TINY
from tests.helpers.run_folders import TRAINED_ROUND as ROUND


def _labels(folder):
    return {p.name: np.asanyarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*_seg.nii.gz"))}


def test_exported_model_reproduces_predict_voxel_for_voxel(tmp_path, trained_site, capsys):
    run, site, scans = trained_site
    model_dir = tmp_path / "my-model"
    assert main(["export", "--config", str(site), "--run", str(run), "--out", str(model_dir)]) == 0
    assert "round 2" in capsys.readouterr().out
    assert {p.name for p in model_dir.iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "plan.json",
        "labels.json",
        "provenance.json",
        README_FILE,
    }
    assert json.loads((model_dir / "labels.json").read_text()) == {"background": 0, "lesion": 1}
    provenance = json.loads((model_dir / "provenance.json").read_text())
    assert (provenance["run"], provenance["round"], provenance["site_dice"], provenance["federation_dice"]) == (
        "run",
        ROUND,
        0.6125,
        0.55,
    )
    readme = (model_dir / README_FILE).read_text()
    assert "0.6125" in readme and "round 2" in readme
    assert (
        main(
            [
                "predict",
                "--config",
                str(site),
                "--run",
                str(run),
                "--input",
                str(scans),
                "--output",
                str(tmp_path / "from-run"),
            ]
        )
        == 0
    )
    assert (
        main(["predict", "--model", str(model_dir), "--input", str(scans), "--output", str(tmp_path / "from-model")])
        == 0
    )
    from_run, from_model = _labels(tmp_path / "from-run"), _labels(tmp_path / "from-model")
    assert from_run.keys() == from_model.keys() and len(from_run) == 2
    assert all(np.array_equal(from_run[k], from_model[k]) for k in from_run)


def test_a_personalized_export_needs_the_copy_cross_site_evaluation_scored(tmp_path, trained_site, capsys):
    """No new fine-tuning at export: without the scored copy (tests/test_site_state.py keeps one) it refuses."""
    run, site, _ = trained_site
    assert (
        main(["export", "--config", str(site), "--run", str(run), "--personalize", "--out", str(tmp_path / "p")]) == 2
    )
    assert "no personalized copy" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_readme_snippet_loads_the_same_network_with_torch_and_monai(tmp_path, trained_site, monkeypatch) -> None:
    run, site, _ = trained_site
    model_dir = tmp_path / "m"
    assert main(["export", "--config", str(site), "--run", str(run), "--weights", "last", "--out", str(model_dir)]) == 0
    found = re.search(r"```python\n(.*?)```", (model_dir / README_FILE).read_text(), re.DOTALL)
    assert found is not None, "the exported README holds a python snippet"
    snippet = found.group(1)
    monkeypatch.chdir(model_dir)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the documented snippet itself is what is tested
    ours, _, _ = load_site_model(model_dir)
    ours.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(scope["net"](x), ours(x))
    norm_key = next(k for k in ours.state_dict() if "adn.N.weight" in k)
    assert not torch.equal(
        ours.state_dict()[norm_key], build_model(load_config(None, TINY).model).state_dict()[norm_key]
    )


def test_audit_lists_every_export(tmp_path, trained_site, capsys):
    run, site, _ = trained_site
    for i, weights in enumerate(("best", f"round-{ROUND}")):
        assert (
            main(
                [
                    "export",
                    "--config",
                    str(site),
                    "--run",
                    str(run),
                    "--weights",
                    weights,
                    "--out",
                    str(tmp_path / f"export-{i}"),
                ]
            )
            == 0
        )
    assert [e["weights"] for e in read_jsonl(tmp_path / "state" / EXPORT_LOG)] == ["best", "round-2"]
    capsys.readouterr()
    assert main(["audit", "--config", str(site)]) == 0
    text = capsys.readouterr().out
    assert "model exports: 2" in text and str((tmp_path / "export-1").resolve()) in text
    assert main(["audit", "--config", str(site), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)["exports"]
    assert [(e["weights"], e["round"]) for e in exported] == [("best", ROUND), ("round-2", ROUND)]
    assert all(len(e["sha256"]) == 64 for e in exported)


def test_export_refuses_a_site_that_never_trained_and_a_used_folder(tmp_path, trained_site, capsys):
    run, site, _ = trained_site
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump({"site": {"name": "new", "state_dir": str(tmp_path / "new-state")}}))
    assert main(["export", "--config", str(fresh), "--run", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "never trained" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert main(["export", "--config", str(site), "--run", str(run), "--out", str(used)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "new-state" / EXPORT_LOG).exists()
