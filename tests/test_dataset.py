"""Both dataset layouts load as they are, multi-channel included, through the plan's preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import load_config
from common.dataset import DatasetError, read_dataset, split_cases
from common.fingerprint import merge_fingerprints, site_fingerprint
from common.plan import make_plan
from common.preprocess import PreprocessedCases
from tests.helpers.nifti_cases import msd_dataset, nnunet_dataset


def _plan(spec, *overrides):
    cfg = load_config(None, [f"model.in_channels={spec.num_channels:d}", *overrides])
    fp = merge_fingerprints({"a": site_fingerprint(spec, [c.case_id for c in spec.cases])})
    return make_plan(fp, cfg.data, cfg.model, "test")


def test_nnunet_layout_multichannel(tmp_path):
    spec = read_dataset(nnunet_dataset(tmp_path / "Dataset001_X", channels=("T1", "T2")))
    assert spec.layout == "nnunet" and spec.num_channels == 2 and spec.num_classes == 2
    assert [c.case_id for c in spec.cases] == ["case_000", "case_001", "case_002"]
    assert [p.name for p in spec.cases[0].images] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    plan = _plan(spec)
    volume = PreprocessedCases(tmp_path / "cache", plan, spec.num_classes).load(spec.cases[0])
    assert volume.image.shape[0] == 2 and volume.label.shape[0] == 1
    assert volume.image.shape[1:] == volume.label.shape[1:]
    # per-case z-score for MRI channels: each channel has mean 0, std 1
    assert np.allclose(np.asarray(volume.image).mean(axis=(1, 2, 3)), 0, atol=1e-3)
    assert (tmp_path / "cache" / f"plan-{plan.version}" / "case_000" / "image.npy").is_file()


def test_msd_layout_4d_images(tmp_path):
    spec = read_dataset(msd_dataset(tmp_path / "Task01_X"))
    assert spec.layout == "msd" and spec.num_channels == 2
    assert spec.labels == {"background": 0, "lesion": 1}
    plan = _plan(spec)
    image, label = PreprocessedCases(tmp_path / "cache", plan, 2).load(spec.cases[1])
    assert image.shape[0] == 2 and set(np.unique(label)) == {0, 1}


def test_ct_plan_normalizes_with_federation_statistics(tmp_path):
    spec = read_dataset(nnunet_dataset(tmp_path / "Dataset002_CT"))
    plan = _plan(spec)
    norm = plan.normalization[0]
    assert norm.scheme == "ct" and norm.clip_low < norm.mean < norm.clip_high
    image, label = PreprocessedCases(tmp_path / "cache", plan, 2).load(spec.cases[0])
    assert image.max() <= (norm.clip_high - norm.mean) / norm.std + 1e-4


def test_missing_files_and_bad_json_are_named(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset003_X")
    (root / "imagesTr" / "case_001_0000.nii.gz").unlink()
    spec = read_dataset(root)  # the incomplete case is kept aside for the check to report, never trained on
    assert [c.case_id for c in spec.cases] == ["case_000", "case_002"]
    (unpaired,) = spec.unpaired
    assert unpaired.file == "labelsTr/case_001.nii.gz" and "imagesTr/case_001_0000.nii.gz" in unpaired.problem
    (root / "dataset.json").write_text("{")
    with pytest.raises(DatasetError, match="dataset.json is not valid JSON"):
        read_dataset(root)
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": [1, 2]}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="region-based"):
        read_dataset(root)


def test_split_is_deterministic_and_recorded(tmp_path):
    from client.site_data import open_split
    from client.site_state import SiteState

    root = nnunet_dataset(tmp_path / "Dataset004_X", n_cases=4)
    cfg = load_config(
        None,
        [f"site.data_dir={root}", f"site.state_dir={tmp_path / 's'}", "model.in_channels=1", "model.out_channels=2"],
    )
    state = SiteState(tmp_path / "s")
    _, train, val = open_split(cfg, state)
    assert (train, val) == split_cases([f"case_{i:03d}" for i in range(4)], 0.25, 0)
    recorded = state.info()["split"]
    assert (recorded["train"], recorded["val"], recorded["seed"]) == (train, val, 0)
    assert val and train and not set(train) & set(val) and sorted(train + val) == [f"case_{i:03d}" for i in range(4)]
