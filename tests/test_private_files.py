"""Files that show a patient or hold a model stay owner-only whatever the umask (issue 21, L4).

Each test sets the most permissive umask a site or centre could run under
(0000) and writes through the real code path: the centre's checkpoints, the
site daemon's first step, a site report picture and an exported model.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from common.private import DIR_MODE, FILE_MODE


@pytest.fixture
def open_umask():
    """Everything created while the test runs would be world-writable without an explicit mode."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_best_and_last_checkpoints_are_owner_only_like_the_rounds(tmp_path, open_umask):
    from server.checkpoints import Checkpoints

    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.save_round(1, {"w": torch.ones(3)})
    assert checkpoints.offer_best(1, 0.5)
    for name in ("round-0001.safetensors", "last.safetensors", "best.safetensors"):
        path = next(tmp_path.glob(f"checkpoints/{name.split('.')[0]}*"))
        assert _mode(path) == FILE_MODE, f"{path.name} is {oct(_mode(path))}"


def test_the_site_state_folder_is_private_before_any_clientapp_runs(tmp_path, open_umask):
    from client.daemon import prepare_state
    from common.config import SiteConfig

    state = tmp_path / "site" / "state"
    site = SiteConfig(
        name="h",
        data_dir=str(tmp_path),
        state_dir=str(state),
        server_address="127.0.0.1:1",
        approved_bundles=["ab" * 32],
    )
    prepare_state(site)
    assert _mode(state) == DIR_MODE


def test_a_report_picture_is_owner_only(tmp_path, open_umask):
    from client.site_report import draw_overlay

    truth = np.zeros((8, 8, 4), dtype=np.int64)
    truth[2:5, 2:5, 1] = 1
    path = draw_overlay(
        np.random.default_rng(0).random((1, 8, 8, 4)).astype(np.float32),
        truth,
        truth,
        2,
        "case_007",
        tmp_path / "report" / "case_007.png",
    )
    assert path.is_file() and _mode(path) == FILE_MODE


def test_an_exported_model_folder_is_owner_only(tmp_path, trained_site, open_umask):
    from client.cli import main

    run, site, _ = trained_site
    out = tmp_path / "exported"
    assert main(["export", "--config", str(site), "--run", str(run), "--out", str(out)]) == 0
    assert _mode(out) == DIR_MODE
