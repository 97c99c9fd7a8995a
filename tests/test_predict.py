"""Prediction writes integer label maps with exactly the input's shape, affine and orientation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.inferers import sliding_window_inference
from safetensors.torch import save_file

from client.cli import main
from client.predict import SlabInferer, to_original
from common.config import load_config
from common.dataset import Case
from common.model import build_model
from common.plan import ChannelNorm, Plan
from common.preprocess import prepare_case
from server.server_app import initial_weights
from tests.nifti_cases import LPS, RAS, oblique, phantom, save

AFFINES = {"RAS": RAS, "LPS": LPS, "oblique": oblique()}
TINY = ["model.channels=[8, 16, 32]", "model.strides=[2, 2]", "train.adapt_norm_steps=2", "train.batch_size=1"]


def _plan(spacing) -> Plan:
    return Plan(tuple(spacing), (16, 16, 16), (ChannelNorm("zscore"),), (24, 20, 16))


def _case(tmp_path, affine):
    image, label = phantom(lesion=5)
    return Case("c", (save(image, affine, tmp_path / "c_0000.nii.gz"),), (save(label, affine, tmp_path / "c.nii.gz"),)), label


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_plan_space_maps_back_onto_the_input_grid(tmp_path, orientation):
    from common.preprocess import prepare_image

    affine = AFFINES[orientation]
    case, label = _case(tmp_path, affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    ras_zooms = zooms[np.argsort(nib.orientations.io_orientation(affine)[:, 0])]
    _, geometry = prepare_image(case.images, _plan(ras_zooms))
    _, plan_labels = prepare_case(case, _plan(ras_zooms))  # native spacing: the round trip is exact
    assert np.array_equal(to_original(plan_labels[0], geometry), label)
    _, coarse = prepare_case(case, _plan([2.0, 2.0, 2.0]))  # resampled: same grid, nearly the same mask
    back = to_original(coarse[0], geometry)
    assert back.shape == label.shape
    assert 2 * (back & label).sum() / (back.sum() + label.sum()) > 0.5


def test_slab_inferer_matches_monai_sliding_window():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model).eval()
    image = torch.randn(1, 40, 36, 50)
    image[:, :, :, 30:] = 0.0  # constant windows are computed once and reused
    with torch.no_grad():
        ref = sliding_window_inference(image[None], (16, 16, 16), 1, model, overlap=0.25)[0].argmax(0).numpy()
    ours = SlabInferer(model, (16, 16, 16), 2)(image)
    assert ours.shape == ref.shape and (ours == ref).mean() > 0.999


def test_predict_command_writes_input_geometry(tmp_path, capsys):
    cfg = load_config(None, TINY)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    _plan([1.0, 1.2, 2.0]).save(run / "plan.json")
    weights, _ = initial_weights(cfg)
    save_file(weights, str(run / "checkpoints" / "best.safetensors"))
    scans = tmp_path / "scans"
    for name, affine in AFFINES.items():
        save(phantom()[0], affine, scans / f"{name}_0000.nii.gz")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h", "state_dir": str(tmp_path / "state")}}))
    out = tmp_path / "out"
    for extra in ([], ["--adapt-norm"]):
        assert main(["predict", "--config", str(site), "--run", str(run), "--input", str(scans),
                     "--output", str(out), *extra]) == 0
        for name, affine in AFFINES.items():
            src, seg = nib.load(str(scans / f"{name}_0000.nii.gz")), nib.load(str(out / f"{name}_seg.nii.gz"))
            assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-5)
            assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(affine)
            data = np.asanyarray(seg.dataobj)
            assert np.issubdtype(data.dtype, np.integer) and set(np.unique(data)) <= {0, 1}
    assert "adapted the normalization layers" in capsys.readouterr().out


def test_predict_refuses_a_missing_run(tmp_path, capsys):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h"}}))
    code = main(["predict", "--config", str(site), "--run", str(tmp_path / "nope"), "--input", str(tmp_path),
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "config.yaml not found" in capsys.readouterr().err
