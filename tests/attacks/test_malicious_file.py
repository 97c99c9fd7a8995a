"""Attacks by a malicious file at a site: scans whose headers carry identifiers, case names that are paths,
inputs that do not fit the model; and the site's own files, private whatever the umask.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from common import keys
from tests.helpers.run_folders import run_folder, site_yaml
from tests.helpers.site_harness import one_site

# --- finding 12: local files ---------------------------------------------------------------------------------


def test_local_files_are_private_and_carry_no_identifiers(tmp_path, tiny_federation):
    """Regression of finding 12."""
    import json
    import os
    import stat

    import nibabel as nib

    from client import client_app
    from client.cli import main
    from common.dataset import DatasetError, read_dataset
    from tests.helpers.local_grid import LocalGrid
    from tests.helpers.nifti_cases import RAS, nnunet_dataset, phantom

    # Permissions: the state directory (cache of preprocessed scans) is owner-only whatever the umask.
    old = os.umask(0o022)
    try:
        cfg = one_site(tmp_path / "perm", tiny_federation["site-2"])
        grid = LocalGrid(cfg, client_app.app)
        from tests.helpers.envelopes import incoming

        (answer,) = grid.send_and_receive(
            [incoming(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 0})}), "query.fingerprint", node_id=1)]
        )
        assert answer.has_content()
        state = tmp_path / "perm" / "e" / "sites" / "site-1"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
    finally:
        os.umask(old)

    # PHI in the header of an input never reaches the prediction.
    run, site = run_folder(tmp_path), site_yaml(tmp_path)
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    image = nib.Nifti1Image(phantom()[0], RAS)
    image.header["descrip"] = b"DOE^JANE 1970-01-01 MRN123456"
    image.header["db_name"] = b"PATIENT_DOE"
    image.header["aux_file"] = b"MRN123456"
    image.header["intent_name"] = b"DOE"
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"DOE^JANE"))
    nib.save(image, str(scans / "head_0000.nii.gz"))
    assert main(["predict", "--config", str(site), "--run", str(run), "--input", str(scans), "--output", str(out)]) == 0
    seg = out / "head_seg.nii.gz"
    assert b"DOE" not in nib.load(str(seg)).header.binaryblock and not nib.load(str(seg)).header.extensions
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600

    # Two inputs that map to one output name are refused; a two-channel case is one case.
    nib.save(nib.Nifti1Image(phantom(seed=1)[0], RAS), str(scans / "head_0001.nii.gz"))
    before = seg.read_bytes()
    assert main(["predict", "--config", str(site), "--run", str(run), "--input", str(scans), "--output", str(out)]) == 2
    assert seg.read_bytes() == before
    run2 = run_folder(tmp_path, in_channels=2, name="run-2")
    assert (
        main(
            [
                "predict",
                "--config",
                str(site),
                "--run",
                str(run2),
                "--input",
                str(scans),
                "--output",
                str(tmp_path / "out2"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["head_seg.nii.gz"]

    # A case id of '..' (an MSD entry named '...nii.gz') is refused before any cache folder is touched.
    msd = tmp_path / "msd"
    nnunet = nnunet_dataset(tmp_path / "nn", n_cases=1)
    (msd / "imagesTr").mkdir(parents=True)
    (nnunet / "imagesTr" / "case_000_0000.nii.gz").rename(msd / "imagesTr" / "...nii.gz")
    (msd / "labelsTr").mkdir()
    (nnunet / "labelsTr" / "case_000.nii.gz").rename(msd / "labelsTr" / "x.nii.gz")
    (msd / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "lesion"},
                "training": [{"image": "./imagesTr/...nii.gz", "label": "./labelsTr/x.nii.gz"}],
            }
        )
    )
    with pytest.raises(DatasetError, match="not a safe folder name"):
        read_dataset(msd)


# --- issue 21, L6: a damaged file at the centre ---------------------------------------------------------------


@pytest.mark.parametrize("optimizer, damaged", [("momentum", {"momentum/w": np.nan})])
def test_damaged_server_optimizer_moments_never_make_the_model_nan(tmp_path, caplog, optimizer, damaged):
    """L6: a restarted server reads the optimizer's moments from disk; moments that are NaN are logged and the
    momentum starts from zero, so the next model is finite. (review finding L6)"""
    from safetensors.numpy import load_file

    from common.runs import LAST_CHECKPOINT
    from tests.helpers.messages import GLOBAL, real_strategy
    from tests.helpers.scripted_grid import honest_answer, run_rounds

    sites = {1: "hospital-a", 2: "hospital-b"}
    settings = (f"federation.server_optimizer={optimizer}",)
    first = run_rounds(tmp_path, sites, honest_answer(sites), 1, *settings)
    saved = first.recorder.checkpoints.optimizer(1)
    assert saved, "the first round saved its moments"
    for name, value in damaged.items():
        saved[name] = np.full_like(saved.get(name, GLOBAL[name.split("/")[1]]), value)
    first.recorder.checkpoints.save_optimizer(1, saved)
    resumed = real_strategy(tmp_path, *settings, nodes=sites, rounds=2, round_offset=1)
    resumed.release.resume(1)
    assert "start again from zero" in caplog.text and "NaN" in caplog.text
    run_rounds(tmp_path, sites, honest_answer(sites), 2, strategy=resumed)
    model = load_file(resumed.recorder.checkpoints.dir / LAST_CHECKPOINT)
    assert resumed.recorder.checkpoints.state.last_round == 2
    assert all(np.isfinite(v).all() for v in model.values())
