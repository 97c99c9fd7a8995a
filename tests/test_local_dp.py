"""A site's own privacy settings (site.yaml): its floors and its local DP, which the centre cannot lower.

The clip and the noise are checked on hand-made arrays; the rest runs the
real ClientApp handler on real NIfTI data, with the centre's configuration
going through the site view (``common.runs.site_view``) as in a deployment,
and ``fedseg-client status`` as the operator runs it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from safetensors.torch import load_file

from client import client_app
from client.cli import main as client_main
from client.dp_ledger import record_release, status_lines
from client.local_dp import add_noise, clip_update, privatize
from client.site_state import SiteState
from common import keys, secagg
from common.config import ConfigError, SiteConfig, load_config
from common.dp_accounting import gaussian_epsilon
from common.params import run_model
from common.wire import from_wire, unpack
from server.server_app import initial_weights
from tests.helpers.local_grid import LocalGrid, federation, model_strategy
from tests.helpers.site_harness import handle, run_fresh, site_setup
from tests.helpers.tiny import tiny

Z, C, DELTA = 0.8, 0.05, 1e-5
"""The site's local DP in these tests: noise std Z * C = 0.04 per coordinate."""


def _site(tmp_path, data_dir, site: dict, *centre: str):
    """A run config with the centre's ``centre`` overrides, and a site.yaml with ``site`` added to its settings."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg, site_yaml = site_setup(tmp_path, data_dir, "site-1", "train.norm_mode=stats", *centre)
    body = yaml.safe_load(site_yaml.read_text())
    body["site"] |= site
    site_yaml.write_text(yaml.safe_dump(body))
    return cfg, site_yaml


def _sent(reply) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error.reason
    return from_wire(unpack(reply.content).array_records[keys.ARRAYS])


def _status(capsys, site_yaml) -> str:
    assert client_main(["status", "--config", str(site_yaml)]) == 0
    return capsys.readouterr().out


def _shown_epsilon(text: str) -> tuple[float, float, int]:
    match = re.search(r"local DP: epsilon (\S+) at delta (\S+) after (\d+) round\(s\)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2)), int(match.group(3))


LOCAL_DP = {"local_dp_noise_multiplier": Z, "local_dp_clipping_norm": C, "local_dp_delta": DELTA}


# --- the mechanism ------------------------------------------------------------------------------------


def test_clipping_bounds_the_update_norm_and_leaves_a_short_one_as_it_is():
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(40, 30)).astype(np.float32), rng.normal(size=(7,)).astype(np.float32)]
    long = [b + rng.normal(scale=2.0, size=b.shape).astype(np.float32) for b in base]
    norm = clip_update(long, base, 1.5)
    assert norm > 30  # about 2 * sqrt(1207)
    after = math.sqrt(sum(float(np.sum((u - b).astype(np.float64) ** 2)) for u, b in zip(long, base, strict=True)))
    assert after == pytest.approx(1.5, rel=1e-4)
    short = [b + np.float32(1e-3) for b in base]
    before = [s.copy() for s in short]
    assert clip_update(short, base, 1.5) < 1.5
    assert all(np.array_equal(s, b) for s, b in zip(short, before, strict=True))
    unchanged = [b.copy() for b in base]
    assert clip_update(unchanged, base, 1.5) == 0.0 and all(
        np.array_equal(u, b) for u, b in zip(unchanged, base, strict=True)
    )


def test_noise_has_the_configured_std_and_is_unbiased():
    arrays = [np.zeros((300, 400), np.float32), np.zeros((80_000,), np.float32)]
    add_noise(arrays, 0.3, np.random.default_rng(1))
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    # 200,000 draws: the sample std is within 0.5% of 0.3 and the mean within 5 standard errors of 0
    assert flat.std() == pytest.approx(0.3, rel=0.005)
    assert abs(flat.mean()) < 5 * 0.3 / math.sqrt(flat.size)
    assert all(a.std() > 0.29 for a in arrays)  # every tensor gets noise, not only the first


def test_every_forked_process_draws_its_own_noise():
    """ClientApps are forked from a warm process: noise from an inherited generator would repeat every round."""
    draws = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: draw, send, leave without running any of pytest's teardown
            arrays = [np.zeros(64, np.float32)]
            add_noise(arrays, 1.0)
            os.write(write, arrays[0].tobytes())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            draws.append(np.frombuffer(f.read(), np.float32))
        os.waitpid(pid, 0)
    assert draws[0].size == draws[1].size == 64
    assert not np.allclose(draws[0], draws[1])


def test_privatize_sends_the_clipped_update_plus_noise_of_std_z_times_c(tmp_path):
    """On a model-sized update: what leaves minus w^t has std z*C (the clipped part adds C^2/d)."""
    run = SiteState(tmp_path / "state").run_named("r", "0123456789ab")
    gen = torch.Generator().manual_seed(0)
    received = {"a": torch.randn(200, 500, generator=gen), "b": torch.randn(1000, generator=gen)}
    trained = {k: v + torch.randn(v.shape, generator=gen) for k, v in received.items()}  # norm about 317
    kept = {k: v.clone() for k, v in trained.items()}
    site = SiteConfig(local_dp_noise_multiplier=2.0, local_dp_clipping_norm=0.1)
    out = privatize(site, run, 3, received, trained)
    delta = torch.cat([(out[k] - received[k]).ravel() for k in received]).double()
    assert delta.std().item() == pytest.approx(0.2, rel=0.01)
    assert all(torch.equal(trained[k], kept[k]) for k in kept)  # the site's own model is not touched
    assert run.info()["local_dp"]["releases"][0]["round"] == 3
    off = privatize(SiteConfig(), run, 4, received, trained)
    assert off is trained and len(run.info()["local_dp"]["releases"]) == 1  # off: nothing changed or counted


def test_status_adds_up_every_run_the_site_took_part_in(tmp_path):
    """Runs train on the same patients: besides each run's epsilon, status shows them composed."""
    state = SiteState(tmp_path / "state")
    first, second = state.run_named("a", "0123456789ab"), state.run_named("b", "ba9876543210")
    for rnd in (1, 2, 3):
        record_release(first, rnd, 4.0, 1.0, 1e-5)
    record_release(second, 1, 2.0, 1.0, 1e-6)
    lines = status_lines(state.root)
    assert len(lines) == 3
    assert _shown_epsilon(lines[0]) == (pytest.approx(gaussian_epsilon(2.0, 3, 1e-5), rel=1e-3), 1e-5, 3)
    assert _shown_epsilon(lines[1]) == (pytest.approx(gaussian_epsilon(1.0, 1, 1e-6), rel=1e-3), 1e-6, 1)
    mu = math.sqrt(3 / 2.0**2 + 1 / 1.0**2)  # releases of z/2 = 2 (three) and 1 (one), composed exactly
    match = re.search(
        r"all 2 runs together \(the same patients\): epsilon (\S+) at delta (\S+) after 4 round", lines[2]
    )
    assert match and float(match.group(2)) == 1e-6
    assert float(match.group(1)) == pytest.approx(gaussian_epsilon(1 / mu, 1, 1e-6), rel=1e-3)

    said = subprocess.run(  # the command a site's IT runs often: it reads files, it loads no torch
        [sys.executable, "-c", STATUS_WITHOUT_TORCH, str(state.root)], capture_output=True, text=True, timeout=60
    )
    assert said.returncode == 0 and said.stdout.strip() == "[]", said.stdout + said.stderr


STATUS_WITHOUT_TORCH = """
import sys
from pathlib import Path
from client.status import report
assert "local DP" in "".join(report(Path(sys.argv[1])))
print([m for m in ("torch", "monai") if m in sys.modules])
"""


def test_local_dp_settings_are_checked():
    with pytest.raises(ConfigError, match="max_norm_travel: stats or local"):
        load_config(None, ["site.local_dp_noise_multiplier=1.0", "site.max_norm_travel=shared"])
    with pytest.raises(ConfigError, match="local_dp_clipping_norm > 0"):
        load_config(None, ["site.local_dp_clipping_norm=0"])
    with pytest.raises(ConfigError, match="local_dp_noise_multiplier must be >= 0"):
        load_config(None, ["site.local_dp_noise_multiplier=-1"])


# --- at the site, through the real ClientApp --------------------------------------------------------------


def test_norm_tensors_are_never_noised_and_the_update_leaves_noised(tmp_path, tiny_federation):
    """Two copies of one site train the same round bit for bit; only the one with local DP noises what it sends."""
    plain_cfg, plain_yaml = _site(tmp_path / "plain", tiny_federation["site-1"], {})
    dp_cfg, dp_yaml = _site(tmp_path / "dp", tiny_federation["site-1"], LOCAL_DP)
    plain, private = (
        _sent(handle(plain_cfg, plain_yaml, MessageType.TRAIN)),
        _sent(handle(dp_cfg, dp_yaml, MessageType.TRAIN)),
    )
    _, split, _ = run_model(dp_cfg)
    assert set(private) == set(plain) == set(split.travelling)
    norm_plain = load_file(SiteState(tmp_path / "plain" / "site-1-state").run(plain_cfg).norm_path(1))
    norm_dp = load_file(SiteState(tmp_path / "dp" / "site-1-state").run(dp_cfg).norm_path(1))
    assert norm_dp.keys() == norm_plain.keys() and set(norm_dp) == set(split.local)
    assert any(k.endswith(".running_var") for k in norm_dp)
    assert all(torch.equal(norm_dp[k], norm_plain[k]) for k in norm_dp)  # the site's own tensors: as trained
    weights, _ = initial_weights(dp_cfg)
    noise = torch.cat([(private[k] - weights[k]).ravel() for k in split.travelling]).double()
    update = torch.cat([(plain[k] - weights[k]).ravel() for k in split.travelling]).double()
    assert update.norm() > 4 * C  # training moved it further than the clip allows (0.29 here)
    assert noise.std().item() == pytest.approx(Z * C, rel=0.05)  # ~ 90,000 coordinates; clipped part negligible
    affine = [k for k in split.travelling if k.endswith(".weight") and k.rsplit(".", 1)[0] + ".running_var" in norm_dp]
    assert affine and all(not torch.equal(private[k], plain[k]) for k in affine)  # stats mode: they leave, noised


@pytest.mark.processes
def test_status_shows_the_accountants_epsilon_and_it_survives_a_restart(tmp_path, tiny_federation, capsys):
    cfg, site_yaml = _site(tmp_path, tiny_federation["site-1"], LOCAL_DP)
    for server_round in (1, 2):
        _sent(handle(cfg, site_yaml, MessageType.TRAIN, server_round))
    eps, delta, rounds = _shown_epsilon(_status(capsys, site_yaml))
    # 2C sensitivity: each release is a Gaussian mechanism of multiplier Z / 2
    assert (delta, rounds) == (DELTA, 2) and eps == pytest.approx(gaussian_epsilon(Z / 2, 2, DELTA), rel=1e-3)
    assert run_fresh(cfg, site_yaml, "train", 3)["error"] is None  # a new ClientApp process, as after a restart
    eps3, _, rounds3 = _shown_epsilon(_status(capsys, site_yaml))
    assert rounds3 == 3 and eps3 == pytest.approx(gaussian_epsilon(Z / 2, 3, DELTA), rel=1e-3) and eps3 > eps
    recorded = json.loads((SiteState(tmp_path / "site-1-state").run(cfg).folder / "run.json").read_text())
    assert [r["round"] for r in recorded["local_dp"]["releases"]] == [1, 2, 3]


def test_the_centre_cannot_lower_the_sites_floors_or_turn_off_its_local_dp(tmp_path, tiny_federation):
    """The centre's own site.* settings reach the site in the run config, and the site view drops them."""
    lowering = (
        "site.min_local_steps=1",
        "site.min_batch_size=1",
        "site.local_dp_noise_multiplier=0",
        "site.local_dp_clipping_norm=1000",
    )
    floors = {"min_local_steps": 2, "min_batch_size": 2}
    cfg, site_yaml = _site(
        tmp_path / "floors", tiny_federation["site-1"], floors, "train.local_steps=1", "train.batch_size=1", *lowering
    )
    assert cfg.site.min_local_steps == 1 and cfg.site.local_dp_noise_multiplier == 0  # what the centre sent
    refused = handle(cfg, site_yaml, MessageType.TRAIN)
    assert refused.has_error() and "under this site's floor" in refused.error.reason
    cfg, site_yaml = _site(tmp_path / "dp", tiny_federation["site-1"], LOCAL_DP, *lowering)
    sent = _sent(handle(cfg, site_yaml, MessageType.TRAIN))
    weights, _ = initial_weights(cfg)
    noise = torch.cat([(sent[k] - weights[k]).ravel() for k in sent]).double()
    assert noise.std().item() == pytest.approx(Z * C, rel=0.05)  # the site's own C and z, not the centre's
    run = SiteState(tmp_path / "dp" / "site-1-state").run(cfg)
    assert run.info()["local_dp"]["releases"][0]["clipping_norm"] == C


@pytest.mark.simulation
def test_with_secure_aggregation_the_noise_is_in_what_the_centre_unmasks(tmp_path, tiny_federation):
    """Three sites with local DP under SecAgg+: the centre's mean update is the mean of noised updates.

    One round, no server step: w^1 - w^0 is the mean of three clipped updates
    (norm at most C each) plus three independent noises of std z*C, so its
    coordinates have std z*C / sqrt(3). Noise added after masking, or not at
    all, would leave the mean of three clipped updates: a std about 100 times
    smaller.
    """
    z, clip = 1.0, 0.02  # noised norm z*C*sqrt(34,886) = 3.7, inside federation.secagg_clip_norm (10)
    own = tmp_path / "site.yaml"
    own.write_text(
        yaml.safe_dump({"site": {"min_cohort": 1, "local_dp_noise_multiplier": z, "local_dp_clipping_norm": clip}})
    )
    sites = [
        f"simulation.sites.{name}.{key}={value}"
        for name, folder in tiny_federation.items()
        for key, value in (("data_dir", folder), ("site_yaml", own))
    ]
    cfg = federation(
        load_config(
            None,
            tiny(
                "federation.secure_aggregation=secagg+",
                "federation.norm_bound=0",
                "federation.server_optimizer=none",
                "federation.rounds=1",
                "federation.cross_eval=false",
                f"federation.runs_dir={tmp_path / 'runs'}",
                "federation.run_name=secagg-ldp",
                *sites,
            ),
        ),
        tiny_federation,
    )
    folder = tmp_path / "runs" / "secagg-ldp"
    strategy, weights = model_strategy(cfg, folder)
    grid = LocalGrid(cfg, client_app.app)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(weights),
        num_rounds=1,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    trains = [r for r in grid.received if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == 3 and all(set(r.content.array_records[keys.ARRAYS]) == {secagg.MASKED} for r in trains)
    moved = torch.cat([(torch.from_numpy(result.arrays[k].numpy()) - weights[k]).ravel() for k in weights]).double()
    assert moved.std().item() == pytest.approx(z * clip / math.sqrt(3), rel=0.02)
    for name in tiny_federation:
        run = SiteState(folder / "sites" / name).run(cfg)
        assert [r["round"] for r in run.info()["local_dp"]["releases"]] == [1]
