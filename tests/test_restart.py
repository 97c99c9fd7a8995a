"""A restarted run resumes as itself, and one centre runs at a time (real files, locks and sockets)."""

from __future__ import annotations

import socket

import pytest

from common.cli import UserError
from common.config import load_config
from common.files import read_jsonl
from common.flower_env import free_port
from common.runs import METRICS_FILE, SERVER_CONFIG_FILE
from server.launcher import claim_centre, prepare
from server.resume import ConfigChanged, restarted_config
from tests.helpers.tiny import TINY, tiny


def centre_config(tmp_path, *overrides: str):
    return prepare(
        load_config(
            None,
            tiny(
                f"federation.runs_dir={tmp_path / 'runs'}",
                "federation.run_name=r",
                f"server.state_dir={tmp_path / 'state'}",
                *overrides,
            ),
        )
    )


def test_an_edited_configuration_is_refused_with_the_keys_that_differ(tmp_path):
    first = centre_config(tmp_path, "federation.rounds=8", "train.local_steps=40")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / SERVER_CONFIG_FILE).write_text(first.to_yaml())
    edited = centre_config(tmp_path, "federation.rounds=3", "train.local_steps=5", "federation.round_timeout_s=60")
    assert edited.federation.run_id == first.federation.run_id  # the run keeps its identity
    with pytest.raises(ConfigChanged) as refused:
        restarted_config(edited, run, allow_change=False)
    message = str(refused.value)
    assert "federation.rounds: 8 in the run, 3 now" in message and "train.local_steps: 40" in message
    assert "round_timeout_s" not in message  # operational: may change on restart
    assert (
        restarted_config(
            centre_config(tmp_path, "federation.rounds=8", "train.local_steps=40"), run, allow_change=False
        ).federation.rounds
        == 8
    )
    taken = restarted_config(edited, run, allow_change=True)
    assert taken.federation.rounds == 3
    change = [e for e in read_jsonl(run / METRICS_FILE) if e["event"] == "config-change"]
    assert change and change[0]["changes"]["federation.rounds"] == [8, 3]


def test_a_second_server_on_the_same_state_folder_is_refused_naming_the_first(tmp_path):
    cfg = centre_config(
        tmp_path,
        "server.fleet_host=127.0.0.1",
        f"server.fleet_port={free_port()}",
        f"server.superlink_port={free_port()}",
    )
    held = claim_centre(cfg)
    try:
        with pytest.raises(UserError, match=r"another fedseg-server is running: pid \d+ \(fedseg-server run r\)"):
            claim_centre(cfg)
    finally:
        held.close()
    claim_centre(cfg).close()  # released with its holder


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = centre_config(
            tmp_path, "server.fleet_host=127.0.0.1", f"server.fleet_port={port}", f"server.superlink_port={free_port()}"
        )
        with pytest.raises(UserError, match=f"port {port} \\(server.fleet_port\\)"):
            claim_centre(cfg)
    assert not (tmp_path / "runs").exists(), "nothing was submitted or written for the refused start"


def test_a_simulation_asking_for_cuda_on_a_machine_without_it_is_refused_before_it_starts(tmp_path, capsys):
    import torch

    from simulations.cli import main as sim_main

    if torch.cuda.is_available():  # the CI machine has none; on a GPU machine the setting is valid
        return
    code = sim_main(
        [
            "run",
            "--set",
            "train.device=cuda",
            "--set",
            f"federation.runs_dir={tmp_path / 'runs'}",
            "--set",
            f"simulation.data_dir={tmp_path / 'data'}",
        ]
    )
    assert code == 2 and "torch sees no CUDA GPU on this machine" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.simulation
def test_a_simulation_in_which_no_site_trained_fails_with_its_first_reason(tmp_path, capsys):
    """Own sites of 4 cases at a deployed site's default floor (5) cannot train: exit 1, the reason shown."""
    import yaml

    from simulations.cli import main as sim_main
    from simulations.synthetic import generate_federation

    data = generate_federation(tmp_path / "data", n_sites=2, n_cases=4, shape=(32, 32, 24), seed=0)
    config = tmp_path / "own.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **{k: v for k, v in TINY.items()},
                "federation": {
                    "rounds": 1,
                    "runs_dir": str(tmp_path / "runs"),
                    "run_name": "small",
                    "round_timeout_s": 60,
                },
                "simulation": {
                    "cpus_per_site": 1,
                    "ray_num_cpus": 1,
                    "sites": {n: {"data_dir": str(p)} for n, p in data.items()},
                },
            }
        )
    )
    assert sim_main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "the run failed" in err and "first failure: site site-" in err and "(fingerprint)" in err
    assert "fewer cases than the site's minimum cohort" in err
