"""``fedseg-client check`` finds every kind of defect, names the file, and exits non-zero."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import yaml

from client.check import check_dataset
from client.cli import main
from tests.helpers.nifti_cases import RAS, nnunet_dataset, oblique, phantom, save


def _site_yaml(tmp_path, root):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": "s", "data_dir": str(root), "state_dir": str(tmp_path / "st")}}))
    return path


def test_clean_dataset_passes_with_summary(tmp_path, capsys):
    root = nnunet_dataset(tmp_path / "Dataset001_X", n_cases=3)
    site_yaml = _site_yaml(tmp_path, root)
    site_yaml.write_text(site_yaml.read_text().replace("site:", "site:\n  min_cohort: 1", 1))
    assert main(["check", "--config", str(site_yaml)]) == 0
    out = capsys.readouterr().out
    assert "3 case(s)" in out and "spacing (mm" in out and "label 1 'lesion' voxels" in out
    assert out.strip().splitlines()[-1] == "OK: this site can train"
    assert "labels:     0: background, 1: lesion" in out


def test_check_says_ok_only_when_a_deployed_site_would_be_accepted(tmp_path, capsys):
    """With a deployed site's default floor (site.min_cohort 5), 3 cases cannot train: check says so, exit 1."""
    root = nnunet_dataset(tmp_path / "Dataset001_X", n_cases=3)
    assert main(["check", "--config", str(_site_yaml(tmp_path, root))]) == 1
    out = capsys.readouterr().out
    assert "OK: the data can be read" in out  # the files are fine
    assert "-> REFUSED: fewer than site.min_cohort = 5" in out and "sends no validation score" in out
    assert out.strip().splitlines()[-1] == "this site would be REFUSED in a run (see above)"


@pytest.mark.parametrize(
    "defect, file, words",
    [
        ("truncated", "imagesTr/case_001_0000.nii.gz", "unreadable or truncated"),
        ("shape", "labelsTr/case_001.nii.gz", "shape"),
        ("affine", "labelsTr/case_001.nii.gz", "affine differs"),
        ("float_label", "labelsTr/case_001.nii.gz", "not integers"),
        ("unknown_label", "labelsTr/case_001.nii.gz", "not in dataset.json"),
        ("nan", "imagesTr/case_001_0000.nii.gz", "NaN/Inf"),
    ],
)
def test_each_defect_is_reported_with_its_file(tmp_path, capsys, defect, file, words):
    root = nnunet_dataset(tmp_path / "Dataset002_X", n_cases=3)
    image, label = phantom(seed=1)
    target = root / file
    if defect == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif defect == "shape":
        save(label[:-2], RAS, target)
    elif defect == "affine":
        shifted = RAS.copy()
        shifted[0, 3] = 5.0
        save(label, shifted, target)
    elif defect == "float_label":
        save(label.astype(np.float32) * 0.5, RAS, target)
    elif defect == "unknown_label":
        save(label * 7, RAS, target)
    elif defect == "nan":
        image[0, 0, 0] = np.nan
        save(image, RAS, target)
    report = check_dataset(root)
    assert not report.ok
    assert any(f.fatal and f.file == file and words in f.problem for f in report.findings), report.table()
    assert main(["check", "--config", str(_site_yaml(tmp_path, root))]) == 1
    assert file in capsys.readouterr().out


def test_warnings_do_not_fail(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset003_X", n_cases=3, affine=oblique())
    image, label = phantom(seed=2)
    save(np.zeros_like(label), oblique(), root / "labelsTr" / "case_002.nii.gz")
    report = check_dataset(root)
    problems = {f.problem.split(" (")[0] for f in report.findings}
    assert report.ok, report.table()
    assert "empty label" in problems and any(p.startswith("oblique orientation") for p in problems)


def test_check_never_modifies_data(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset004_X", n_cases=2)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    check_dataset(root)
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_client_app_refuses_a_broken_dataset_with_the_message(tmp_path):
    from client.site_data import open_split
    from client.site_state import SiteState
    from common.config import load_config
    from common.dataset import DatasetError

    root = nnunet_dataset(tmp_path / "Dataset005_X", n_cases=3)
    bad = root / "labelsTr" / "case_000.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti"))
    cfg = load_config(None, [f"site.data_dir={root}", f"site.state_dir={tmp_path / 's'}"])
    with pytest.raises(DatasetError, match="labelsTr/case_000.nii.gz: unreadable"):
        open_split(cfg, SiteState(tmp_path / "s"))


def test_the_daemon_refuses_to_join_with_a_broken_case(tmp_path) -> None:
    from client.daemon import check_data
    from common.cli import UserError
    from common.config import SiteConfig

    root = nnunet_dataset(tmp_path / "Dataset004_X", n_cases=2)
    lines: list[str] = []
    check_data(SiteConfig(name="s", data_dir=str(root)), say=lines.append)
    assert "OK: the data can be read" in lines[-1]
    target = root / "labelsTr/case_001.nii.gz"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(UserError, match="(?s)will not join.*labelsTr/case_001.nii.gz: unreadable"):
        check_data(SiteConfig(name="s", data_dir=str(root)), say=lines.append)


def test_unpaired_files_and_a_stale_num_training_are_reported(tmp_path, capsys):
    root = nnunet_dataset(tmp_path / "Dataset005_X", n_cases=4)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    (root / "imagesTr" / "case_002_0000.nii.gz").unlink()
    report = check_dataset(root)
    found = {(f.file, f.problem.split(" (")[0], f.fatal) for f in report.findings}
    assert ("imagesTr/case_001_0000.nii.gz", "image without a label", True) in found
    assert ("labelsTr/case_002.nii.gz", "label without an image", True) in found
    assert ("dataset.json", "numTraining is 4 but 2 complete training case(s) were found", False) in found
    assert main(["check", "--config", str(_site_yaml(tmp_path, root))]) == 1
    out = capsys.readouterr().out
    assert "image without a label" in out and "label without an image" in out and "numTraining is 4" in out


def test_msd_unpaired_entries_and_labelled_test_cases(tmp_path):
    import json

    from tests.helpers.nifti_cases import msd_dataset

    root = msd_dataset(tmp_path / "Task01_X", n_cases=4, modalities=("T1",))
    meta = json.loads((root / "dataset.json").read_text())
    (root / "labelsTr" / "case_0.nii.gz").unlink()
    (root / "imagesTr" / "case_1.nii.gz").unlink()
    image, label = phantom(seed=9)
    save(image, RAS, root / "imagesTr" / "stray.nii.gz")
    save(image, RAS, root / "imagesTs" / "case_t.nii.gz")
    save(label, RAS, root / "labelsTs" / "case_t.nii.gz")
    meta["test"] = [
        "./imagesTs/unlabelled.nii.gz",
        {"image": "./imagesTs/case_t.nii.gz", "label": "./labelsTs/case_t.nii.gz"},
    ]
    meta["numTraining"] = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    report = check_dataset(root)
    found = {(f.file, f.problem.split(" (")[0]) for f in report.findings}
    assert {
        ("imagesTr/case_0.nii.gz", "image without a label"),
        ("labelsTr/case_1.nii.gz", "label without an image"),
        ("imagesTr/stray.nii.gz", "image without a label"),
        ("dataset.json", "numTraining is 3 but 2 complete training case(s) were found"),
    } <= found
    assert [c.case_id for c in report.spec.test_cases] == ["case_t"] and not report.ok
