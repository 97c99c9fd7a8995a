"""The site daemon's data check, run in a child of a real warm parent (client/warm_start.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from client.warm_start import SOCKET_ENV, check_in_child, new_socket_name

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def warm_parent():
    name = new_socket_name()
    proc = subprocess.Popen([sys.executable, "-m", "client.warm_start"], env={**os.environ, SOCKET_ENV: name})
    try:
        yield name, proc
    finally:
        proc.terminate()
        proc.wait(30)


def _verdict(name: str, proc: subprocess.Popen, data_dir) -> dict | None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return check_in_child(name, str(data_dir))
        except ConnectionRefusedError:  # still importing
            time.sleep(0.2)
    raise AssertionError("the warm parent never listened")


def test_an_intact_dataset_passes_with_its_table(warm_parent, tiny_federation):
    verdict = _verdict(*warm_parent, tiny_federation["site-1"])
    assert verdict is not None and verdict["ok"] is True
    assert "4 case(s)" in verdict["table"] and "0 problem(s)" in verdict["table"]


def test_a_broken_case_is_named_and_the_warm_parent_serves_on(warm_parent, tiny_federation, tmp_path):
    data = shutil.copytree(tiny_federation["site-2"], tmp_path / "site-2")
    label = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    label.write_bytes(b"not a nifti file")
    verdict = _verdict(*warm_parent, data)
    assert verdict is not None and verdict["ok"] is False
    assert f"labelsTr/{label.name}" in verdict["message"] and "fedseg-client check" in verdict["message"]
    assert _verdict(*warm_parent, tiny_federation["site-1"])["ok"] is True  # one child per check, the parent stays


def test_nobody_listening_is_said_as_a_refused_connection():
    with pytest.raises(ConnectionRefusedError):
        check_in_child(new_socket_name(), "/nonexistent")
