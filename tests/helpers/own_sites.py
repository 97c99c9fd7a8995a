"""The user's own sites, as a simulation meets them: three small real-NIfTI sites written with
simulations.synthetic, one nnU-Net raw with imagesTs/labelsTs, one in the Decathlon layout with labelled "test"
entries, one held out; a fourth whose scans are DICOM series (tests/helpers/dicom_cases.py); and the sites.yaml
that names them (``simulation.sites``). tests/conftest.py runs ``fedseg-sim run`` on them once (``own_run``), for
test_own_sites, test_cross_eval and test_dicom.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from simulations.synthetic import default_signatures, generate_site
from tests.helpers.dicom_cases import as_dicom_site
from tests.helpers.tiny import TINY

SHAPE = (32, 32, 24)
TRAIN_CASES, TEST_CASES = 4, 2
DICOM_REFERENCE = "dicom-reference"
"""Next to sites.yaml: each scan of the DICOM site as NIfTI, exactly the voxels and affine its series holds."""
SETTINGS: dict[str, dict[str, Any]] = {
    "model": {**TINY["model"], "channels": [4, 8, 16]},
    "data": {**TINY["data"], "val_fraction": 0.25},
    "train": {**TINY["train"], "adapt_norm_steps": 2},
    "federation": {"rounds": 2, "run_name": "own"},
    "simulation": {"cpus_per_site": 1, "ray_num_cpus": 2},
}


def as_decathlon(root: Path) -> None:
    """Rewrite an nnU-Net folder's dataset.json in the Decathlon form, test entries labelled."""
    meta = json.loads((root / "dataset.json").read_text())
    train_ids, test_ids = (
        sorted(p.name.removesuffix(".nii.gz") for p in (root / f"labels{split}").glob("*.nii.gz"))
        for split in ("Tr", "Ts")
    )

    def entry(case: str, split: str) -> dict[str, str]:
        return {"image": f"./images{split}/{case}_0000.nii.gz", "label": f"./labels{split}/{case}.nii.gz"}

    msd = {
        "name": "own",
        "modality": meta["channel_names"],
        "numTraining": len(train_ids),
        "labels": {str(v): k for k, v in meta["labels"].items()},
        "training": [entry(c, "Tr") for c in train_ids],
        "test": [entry(c, "Ts") for c in test_ids],
    }
    (root / "dataset.json").write_text(json.dumps(msd))


def sites_yaml(root: Path, sites: dict[str, dict[str, Any]]) -> Path:
    """``root``/sites.yaml: ``SETTINGS`` with these ``simulation.sites``, each with a site.yaml that accepts the
    generated cohorts (below a deployed site's floor), and the runs under ``root``."""
    small = root / "small-site.yaml"
    small.write_text(yaml.safe_dump({"site": {"min_cohort": 1}}))
    listed = {name: {**site, "site_yaml": str(small)} for name, site in sites.items()}
    config = {
        **SETTINGS,
        "simulation": {**SETTINGS["simulation"], "sites": listed},
        "federation": {**SETTINGS["federation"], "runs_dir": str(root / "runs")},
    }
    path = root / "sites.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_own_sites(root: Path) -> tuple[Path, dict[str, Path]]:
    """The four sites under ``root`` and the sites.yaml naming them: (sites.yaml, site name -> dataset folder)."""
    signatures = default_signatures(4)
    folders = {}
    for i, name in enumerate(["north", "south", "east"]):
        folder = generate_site(
            root / "data", name, TRAIN_CASES, SHAPE, signatures[i], seed=i, dataset_id=201 + i, n_test=TEST_CASES
        )
        if name == "south":
            as_decathlon(folder)
        folders[name] = folder
    source = generate_site(root / "dicom-source", "dcm", TRAIN_CASES, SHAPE, signatures[3], seed=3, dataset_id=204)
    folders["dicom"] = as_dicom_site(source, root / "data" / "Dataset204_Dicom", root / DICOM_REFERENCE)
    sites: dict[str, dict[str, Any]] = {name: {"data_dir": str(folder)} for name, folder in folders.items()}
    sites["east"]["held_out"] = True
    path = sites_yaml(root, sites)
    return path, folders


def site_yaml_of(run: Path, name: str) -> Path:
    """The site.yaml the simulation wrote under ``run`` for the site called ``name`` (site-1.yaml, ... in its order)."""
    return next(p for p in (run / "sites").glob("site-*.yaml") if yaml.safe_load(p.read_text())["site"]["name"] == name)
