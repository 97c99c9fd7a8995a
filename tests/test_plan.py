"""The federated fingerprint holds aggregates only; the plan follows nnU-Net's rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import keys
from common.config import load_config
from common.dataset import read_dataset, split_cases
from common.fingerprint import (
    AXES,
    FINGERPRINT_FORMAT,
    INTENSITY_LEVELS,
    SPACING_LEVELS,
    merge_fingerprints,
    site_fingerprint,
)
from common.labels import channel_codes, label_codes
from common.plan import Plan, PlanError, make_plan
from tests.helpers.nifti_cases import nnunet_dataset

P = keys.FINGERPRINT_PREFIX


def hand_made(spacings, extents, intensities=None, ct=True) -> dict:
    """A site's fingerprint record made by hand from per-case values (as a site would compute it)."""
    spacings, extents = np.asarray(spacings, float), np.asarray(extents, float)
    values = np.asarray(intensities if intensities is not None else [0.0, 1.0], float)
    record = {
        f"{P}format": FINGERPRINT_FORMAT,
        f"{P}cases": len(spacings),
        f"{P}val_cases": 1,
        f"{P}channels": 1,
        f"{P}ct": [int(ct)],
        f"{P}class_fraction_0": [0.99, 0.01],
        f"{P}intensity_0": list(np.percentile(values, INTENSITY_LEVELS)),
        f"{P}fg_voxels_0": float(values.size),
        f"{P}fg_mean_0": float(values.mean()),
        f"{P}fg_std_0": float(values.std()),
        f"{P}label_codes_0": label_codes({"background": 0, "lesion": 1}),
        f"{P}channel_codes_0": channel_codes({"0": "CT" if ct else "MRI"}),
    }
    for a, axis in enumerate(AXES):
        record[f"{P}spacing_{axis}"] = list(np.percentile(spacings[:, a], SPACING_LEVELS))
        record[f"{P}extent_{axis}"] = list(np.percentile(extents[:, a], SPACING_LEVELS))
    return record


def nnunet_target_spacing(spacings, sizes):
    """nnU-Net v2 ExperimentPlanner.determine_fullres_target_spacing, on pooled per-case values."""
    spacings, sizes = np.vstack(spacings), np.vstack(sizes)
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(sizes, 50, 0)
    worst = int(np.argmax(target))
    other = [i for i in range(3) if i != worst]
    if target[worst] > 3 * max(target[other]) and target_size[worst] * 3 < min(target_size[other]):
        t = np.percentile(spacings[:, worst], 10)
        if t < max(target[other]):
            t = max(max(target[other]), t) + 1e-5
        target[worst] = t
    return target


CFG = load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]"])


def test_isotropic_target_is_the_median():
    a = [[1.0, 1.0, 1.0]] * 3 + [[1.2, 1.2, 1.2]] * 2
    b = [[0.8, 0.8, 0.8]] * 2
    ext = [[200.0, 180.0, 160.0]] * 7
    fp = merge_fingerprints({"a": hand_made(a, ext[:5]), "b": hand_made(b, ext[:2])})
    plan = make_plan(fp, CFG.data, CFG.model, "test")
    sizes = np.asarray(ext) / np.asarray(a + b)
    assert np.allclose(plan.target_spacing, nnunet_target_spacing(a + b, sizes), rtol=1e-3)
    assert plan.provenance["anisotropic"] is False


def test_anisotropic_axis_goes_to_its_10th_percentile():
    # 11 cases, so numpy's interpolation lands on a case: quantile conventions agree
    a = [[0.7, 0.7, 2.0]] * 2 + [[0.7, 0.7, 5.0]] * 3
    b = [[0.7, 0.7, 5.0]] * 6
    spacings = a + b
    ext = [[350.0, 350.0, 200.0]] * 11
    fp = merge_fingerprints({"a": hand_made(a, ext[:5]), "b": hand_made(b, ext[:6])})
    plan = make_plan(fp, CFG.data, CFG.model, "test")
    expected = nnunet_target_spacing(spacings, np.asarray(ext) / np.asarray(spacings))
    assert expected[2] < 5.0  # the rule did fire
    assert np.allclose(plan.target_spacing, expected, rtol=2e-3)
    assert plan.provenance["anisotropic"] is True


def test_patch_fits_budget_stride_and_median_shape():
    s = [[1.0, 1.0, 1.0]] * 4
    fp = merge_fingerprints({"a": hand_made(s, [[300.0, 250.0, 90.0]] * 4)})
    cfg = load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]", "data.max_patch_voxels=32768"])
    plan = make_plan(fp, cfg.data, cfg.model, "test")
    assert np.prod(plan.patch_size) <= 32768 and all(p % 4 == 0 for p in plan.patch_size)
    small = merge_fingerprints({"a": hand_made(s, [[30.0, 20.0, 10.0]] * 4)})
    assert make_plan(small, cfg.data, cfg.model, "t").patch_size == (32, 20, 12)


def test_explicit_config_wins_and_is_recorded():
    fp = merge_fingerprints({"a": hand_made([[1.0, 1.0, 1.0]] * 2, [[100.0] * 3] * 2)})
    cfg = load_config(None, ["data.spacing=[2, 2, 2]", "data.patch_size=[32, 32, 32]", "data.normalization=zscore"])
    plan = make_plan(fp, cfg.data, cfg.model, "t")
    assert plan.target_spacing == (2.0, 2.0, 2.0) and plan.patch_size == (32, 32, 32)
    assert plan.normalization[0].scheme == "zscore"
    assert plan.provenance["fixed_by_config"] == ["data.spacing", "data.patch_size", "data.normalization"]


def test_ct_normalization_uses_federation_percentiles_and_moments():
    rng = np.random.default_rng(0)
    x, y = rng.normal(50, 20, 5000), rng.normal(80, 30, 3000)
    s = [[1.0] * 3] * 2
    fp = merge_fingerprints({"a": hand_made(s, [[100.0] * 3] * 2, x), "b": hand_made(s, [[100.0] * 3] * 2, y)})
    norm = make_plan(fp, CFG.data, CFG.model, "t").normalization[0]
    pooled = np.concatenate([x, y])
    assert norm.mean == pytest.approx(pooled.mean()) and norm.std == pytest.approx(pooled.std())
    # merged sketches bracket and closely track the pooled percentiles
    for got, level in ((norm.clip_low, 0.5), (norm.clip_high, 99.5)):
        assert got == pytest.approx(np.percentile(pooled, level), abs=0.05 * pooled.std())


def test_plan_json_roundtrip_and_tampering(tmp_path):
    fp = merge_fingerprints({"a": hand_made([[1.0] * 3] * 2, [[100.0] * 3] * 2)})
    plan = make_plan(fp, CFG.data, CFG.model, "t")
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and again.version == plan.version
    body = json.loads((tmp_path / "plan.json").read_text())
    body["patch_size"] = [8, 8, 8]
    (tmp_path / "plan.json").write_text(json.dumps(body))
    with pytest.raises(PlanError, match="does not match its content"):
        Plan.load(tmp_path / "plan.json")


def test_fingerprint_holds_no_per_case_values(tmp_path):
    small = read_dataset(nnunet_dataset(tmp_path / "Dataset001_A", n_cases=2))
    large = read_dataset(nnunet_dataset(tmp_path / "Dataset002_B", n_cases=5))
    fa = site_fingerprint(small, [c.case_id for c in small.cases])
    fb = site_fingerprint(large, [c.case_id for c in large.cases])
    # the same keys and list lengths whatever the number of cases: nothing is listed per case
    assert {k: np.size(v) for k, v in fa.items()} == {k: np.size(v) for k, v in fb.items()}
    for name, value in fb.items():
        assert name.startswith(P)
        values = value if isinstance(value, list) else [value]
        assert all(isinstance(v, (int, float)) for v in values) and len(values) <= keys.EGRESS_MAX_LIST
    text = json.dumps(fb)
    assert "case_" not in text and str(tmp_path) not in text


def test_plan_made_through_the_real_client_app(tmp_path, tiny_federation):
    """ServerApp side: query every site through Flower's wire format, merge, write plan.json."""
    from client.client_app import app
    from server.planning import plan_federation
    from tests.helpers.local_grid import LocalGrid, federation

    cfg = load_config(
        None,
        [
            "model.channels=[8, 16, 32]",
            "model.strides=[2, 2]",
            f"federation.runs_dir={tmp_path / 'runs'}",
            "federation.run_name=plan",
        ],
    )
    cfg = federation(cfg, tiny_federation)
    run = tmp_path / "runs" / "plan"
    grid = LocalGrid(cfg, app)
    plan = plan_federation(grid, cfg, run)
    assert (run / "plan.json").is_file() and plan.provenance["sites"] == ["site-1", "site-2", "site-3"]
    training = sum(
        len(split_cases([c.case_id for c in read_dataset(d).cases], cfg.data.val_fraction, cfg.data.split_seed)[0])
        for d in tiny_federation.values()
    )
    assert plan.provenance["num_cases"] == training  # every site's training cases, nothing else
    for reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.array_records) == set()
    assert plan_federation(grid, cfg, run).version == plan.version  # a resumed run reuses it
