"""Prediction writes integer label maps with exactly the input's shape, affine and orientation;
mirroring, probabilities and largest-component postprocessing when asked; never the input's header text."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.inferers import sliding_window_inference
from scipy import ndimage

from client.cli import main
from client.predict import keep_largest_components, label_to_file_grid
from client.slab_inferer import MIRROR_AXES, InferenceOptions, SlabInferer
from common.config import load_config
from common.dataset import Case
from common.model import build_model
from common.plan import ChannelNorm, Plan
from common.preprocess import prepare_case
from tests.helpers.nifti_cases import LPS, RAS, oblique, phantom, save
from tests.helpers.run_folders import TINY, run_folder, run_plan

AFFINES = {"RAS": RAS, "LPS": LPS, "oblique": oblique()}


def _case(tmp_path, affine):
    image, label = phantom(lesion=5)
    return Case(
        "c", (save(image, affine, tmp_path / "c_0000.nii.gz"),), (save(label, affine, tmp_path / "c.nii.gz"),)
    ), label


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_plan_space_maps_back_onto_the_input_grid(tmp_path, orientation):
    from common.preprocess import prepare_image

    affine = AFFINES[orientation]
    case, label = _case(tmp_path, affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    ras_zooms = zooms[np.argsort(nib.orientations.io_orientation(affine)[:, 0])]
    native, coarse_plan = run_plan(ras_zooms), run_plan([2.0, 2.0, 2.0])
    image = prepare_image(case.images, native)
    _, plan_labels = prepare_case(case, native)  # native spacing: the round trip is exact
    assert np.array_equal(label_to_file_grid(plan_labels[0], image), label)
    _, coarse = prepare_case(case, coarse_plan)  # resampled: same grid, nearly the same mask
    back = label_to_file_grid(coarse[0], prepare_image(case.images, coarse_plan))
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
    run = run_folder(tmp_path, ("best",))
    scans = tmp_path / "scans"
    for name, affine in AFFINES.items():
        save(phantom()[0], affine, scans / f"{name}_0000.nii.gz")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h", "state_dir": str(tmp_path / "state")}}))
    out = tmp_path / "out"
    for extra in ([], ["--no-adapt-norm"]):
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
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        for name, affine in AFFINES.items():
            src, seg = nib.load(str(scans / f"{name}_0000.nii.gz")), nib.load(str(out / f"{name}_seg.nii.gz"))
            assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-5)
            assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(affine)
            data = np.asanyarray(seg.dataobj)
            assert np.issubdtype(data.dtype, np.integer) and set(np.unique(data)) <= {0, 1}
    said = capsys.readouterr().out  # this site never trained: batch statistics are adapted unless told not to
    assert said.count("re-estimating them on these scans first") == 1
    assert said.count("re-estimated the BatchNorm statistics on 3 scan(s)") == 1


def test_predict_refuses_a_missing_run(tmp_path, capsys):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h"}}))
    code = main(
        [
            "predict",
            "--config",
            str(site),
            "--run",
            str(tmp_path / "nope"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "config.yaml not found" in capsys.readouterr().err


def test_mirroring_averages_the_eight_flipped_copies_of_a_window():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model).eval()
    image = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        x = image[None]
        logits = sum(torch.flip(model(torch.flip(x, axes)), axes) for axes in [(), *MIRROR_AXES]) / 8
        expected = torch.softmax(logits, dim=1)[0]
    mirrored = SlabInferer(model, (16, 16, 16), 2, InferenceOptions(mirror=True, probabilities=True)).segment(image)
    plain = SlabInferer(model, (16, 16, 16), 2, InferenceOptions(probabilities=True)).segment(image)
    assert np.allclose(mirrored.probabilities, expected.numpy(), atol=2e-3)
    assert np.array_equal(mirrored.label, expected.argmax(0).numpy())
    assert not np.allclose(plain.probabilities, mirrored.probabilities, atol=2e-3), "mirroring changed nothing"


def test_largest_component_keeps_one_blob_per_foreground_class():
    label = np.zeros((20, 20, 20), np.uint8)
    label[1:4, 1:4, 1:4] = 1  # 27 voxels: kept
    label[10:12, 10:12, 10:12] = 1  # 8 voxels: dropped
    label[15:17, 1:3, 1:3] = 2  # 8 voxels: kept
    label[18, 18, 18] = 2  # 1 voxel: dropped
    kept = keep_largest_components(label, 3)
    assert (kept == 1).sum() == 27 and kept[1, 1, 1] == 1 and kept[10, 10, 10] == 0
    assert (kept == 2).sum() == 8 and kept[18, 18, 18] == 0


def _scan_with_patient_text(path):
    image = nib.Nifti1Image(phantom(lesion=6)[0], LPS)
    header = image.header
    header["descrip"] = b"Doe^John 1961-02-03"
    header["aux_file"] = b"MRN 1234567"
    header["intent_name"] = b"Doe^John"
    header["db_name"] = b"St Elsewhere"
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"patient: John Doe"))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def test_predict_options_on_real_nifti_and_no_header_text_copied(tmp_path):
    run = run_folder(tmp_path, ("best",))
    scan = _scan_with_patient_text(tmp_path / "scans" / "p_0000.nii.gz")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--input",
                str(scan),
                "--output",
                str(out),
                "--tta",
                "--probabilities",
                "--largest-component",
            ]
        )
        == 0
    )
    seg, prob = nib.load(str(out / "p_seg.nii.gz")), nib.load(str(out / "p_prob.nii.gz"))
    for written in (seg, prob):
        h = written.header
        assert all(bytes(h[f].item()).strip(b"\0") == b"" for f in ("descrip", "aux_file", "intent_name", "db_name"))
        assert len(h.extensions) == 0
        assert np.allclose(written.affine, LPS, atol=1e-5)
    label, p = np.asanyarray(seg.dataobj), prob.get_fdata()
    assert p.shape == (*label.shape, 2) and p.min() >= 0 and p.max() <= 1
    assert np.allclose(p.sum(-1), 1.0, atol=2.5 / 255)
    kept = label > 0  # the largest component of the argmax: its probability is the highest there
    assert kept.any() and np.all(p[..., 1][kept] >= 0.5 - 1.5 / 255)
    for c in np.unique(label[label > 0]):
        assert ndimage.label(label == c, structure=np.ones((3, 3, 3)))[1] == 1  # MONAI: full connectivity


@pytest.mark.parametrize("scheme", ["ct", "zscore"])
def test_fast_loading_matches_monai_loading_bit_for_bit(tmp_path, scheme):
    """prepare_image reads 3D files with nibabel + torch; the result is exactly MONAI's LoadImaged pipeline's."""
    from monai import transforms as mt

    from common.preprocess import prepare_image
    from common.reading import RAS_LABELS, plan_size

    image = phantom(lesion=5)[0].astype(np.int16) - 50
    image[:3] = 0  # a zero border to crop
    norm = ChannelNorm("ct", -20.0, 120.0, 50.0, 30.0) if scheme == "ct" else ChannelNorm("zscore")
    for name, affine in AFFINES.items():
        path = save(image, affine, tmp_path / f"{name}.nii.gz")
        plan = Plan((2.0, 2.0, 2.0), (16, 16, 16), (norm,), (24, 20, 16))
        ours = prepare_image((path,), plan)
        in_file_order = prepare_image((path,), plan, file_layout=True)
        ref = mt.Compose(
            [
                mt.LoadImaged("image", reader="NibabelReader", ensure_channel_first=True, dtype=np.float32),
                mt.Orientationd("image", axcodes="RAS", labels=RAS_LABELS),
                mt.CropForegroundd("image", source_key="image", select_fn=lambda x: x != 0),
            ]
        )({"image": str(path)})["image"]
        ref = mt.Resize(plan_size(ref, plan.target_spacing), mode="trilinear", anti_aliasing=False)(ref)
        if scheme == "ct":
            ref = mt.ScaleIntensityRange(-20.0, 120.0, (-20.0 - 50.0) / 30.0, (120.0 - 50.0) / 30.0, clip=True)(ref)
        else:
            ref = mt.NormalizeIntensity()(ref)
        assert ours.is_contiguous() and torch.equal(ours.as_tensor(), ref.as_tensor())
        assert np.allclose(ours.affine, ref.affine)
        assert torch.allclose(in_file_order.as_tensor(), ours.as_tensor(), atol=1e-6)


def test_nonzero_box_is_the_union_over_channels_and_the_whole_volume_when_empty():
    from common.reading import nonzero_box

    image = torch.zeros(2, 10, 12, 14)
    assert nonzero_box(image) == ((0, 10), (0, 12), (0, 14))
    image[0, 2, 3, 4] = -1.0
    image[1, 7, 5, 9] = 2.0
    assert nonzero_box(image) == ((2, 8), (3, 6), (4, 10))


def test_probabilities_go_back_with_background_one_outside_the_crop(tmp_path):
    from client.predict import probabilities_to_file_grid
    from common.preprocess import prepare_image

    image = phantom(lesion=5)[0]
    image[:5] = 0  # cropped away along the file's first axis (R-L in LPS)
    path = save(image, LPS, tmp_path / "p_0000.nii.gz")
    plan = run_plan([2.0, 2.0, 2.0])
    prepared = prepare_image((path,), plan)
    plan_probs = np.stack([np.full(prepared.shape[1:], 0.25), np.full(prepared.shape[1:], 0.75)]).astype(np.float16)
    back = probabilities_to_file_grid(plan_probs, prepared)
    assert back.shape == (*image.shape, 2)
    assert np.allclose(back[:5, ..., 0], 1.0) and np.allclose(back[:5, ..., 1], 0.0)
    assert np.allclose(back[5:, ..., 0], 0.25) and np.allclose(back[5:, ..., 1], 0.75)


def _warned(capsys) -> str:
    return capsys.readouterr().err


def test_predict_warns_about_a_modality_the_model_never_saw_and_strict_refuses(tmp_path, capsys):
    from tests.helpers.dicom_cases import write_series

    run = run_folder(tmp_path, ("best",))  # trained on a z-scored (non-CT) channel
    image, _ = phantom()
    head = np.full_like(image, -1024.0)  # air around a head of soft tissue, in HU
    head[4:-4, 4:-4, 2:-2] = image[4:-4, 4:-4, 2:-2] - 60.0
    ct = save(head, RAS, tmp_path / "scans" / "head_0000.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--input", str(ct), "--output", str(out)]) == 0
    said = _warned(capsys)
    assert f"WARNING: {ct}: channel 0 intensities" in said and "look like CT" in said and "non-CT" in said
    assert (out / "head_seg.nii.gz").is_file()
    strict = tmp_path / "strict"
    assert main(["predict", "--run", str(run), "--input", str(ct), "--output", str(strict), "--strict"]) == 2
    assert "--strict: 1 input(s) differ" in _warned(capsys) and not strict.exists()
    series = tmp_path / "dicom" / "head_0000"
    write_series(head, oblique(), series, modality="CT")
    assert main(["predict", "--run", str(run), "--input", str(series), "--output", str(strict), "--strict"]) == 2
    assert f"{series}: channel 0 is DICOM Modality CT" in _warned(capsys)
    mr = save(image, RAS, tmp_path / "scans" / "brain_0000.nii.gz")  # what the model saw: no warning
    assert main(["predict", "--run", str(run), "--input", str(mr), "--output", str(out), "--strict"]) == 0
    assert "WARNING" not in _warned(capsys)


def test_a_ct_model_warns_about_an_mr_scan(tmp_path, capsys):
    run = run_folder(tmp_path, ("best",))
    Plan((1.0, 1.2, 2.0), (16, 16, 16), (ChannelNorm("ct", -1000.0, 1000.0, 40.0, 300.0),), (24, 20, 16)).save(
        run / "plan.json"
    )
    image, _ = phantom()
    mr = save(image, RAS, tmp_path / "scans" / "brain_0000.nii.gz")
    assert main(["predict", "--run", str(run), "--input", str(mr), "--output", str(tmp_path / "o")]) == 0
    said = _warned(capsys)
    assert f"{mr}: channel 0 intensities" in said and "do not look like CT" in said and "clip range -1000..1000" in said


def test_inputs_that_cannot_run_are_refused_before_anything_is_written(tmp_path, capsys):
    run = run_folder(tmp_path, ("best",))
    image, _ = phantom()
    two = save(np.stack([image, image], axis=-1), RAS, tmp_path / "scans" / "two.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), "--input", str(two), "--output", str(out)]) == 2
    assert f"{two}: 2 channel(s), the model was trained on 1" in _warned(capsys)
    one = save(image, RAS, tmp_path / "one" / "one_0000.nii.gz")
    assert (
        main(["predict", "--run", str(run), "--input", str(one), "--output", str(out), "--output-format", "dicom-seg"])
        == 2
    )
    assert "needs a DICOM series input" in _warned(capsys) and not out.exists()
    from tests.helpers.dicom_cases import write_series

    gappy = tmp_path / "dicom" / "gappy_0000"
    write_series(image, oblique(), gappy, skip=(3,))
    assert main(["predict", "--run", str(run), "--input", str(gappy), "--output", str(out)]) == 2
    assert f"DICOM series folder {gappy}: 1 slice(s) missing (after slice 3" in _warned(capsys)
    assert not out.exists()


def test_nnunet_output_names(tmp_path):
    run = run_folder(tmp_path, ("best",))
    image, _ = phantom()
    scan = save(image, RAS, tmp_path / "scans" / "case_7_0000.nii.gz")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--input",
                str(scan),
                "--output",
                str(out),
                "--output-names",
                "nnunet",
                "--probabilities",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["case_7.nii.gz", "case_7_prob.nii.gz"]
    assert nib.load(str(out / "case_7.nii.gz")).shape == image.shape
    assert nib.load(str(out / "case_7_prob.nii.gz")).shape == (*image.shape, 2)
