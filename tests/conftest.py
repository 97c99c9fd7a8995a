"""Shared fixtures; torch gets one thread, as every test machine here has two cores."""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from common.config import FedsegConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory):
    """Three small synthetic sites on disk (real NIfTI), shared by the tests that only read them."""
    from simulations.synthetic import generate_federation

    root = tmp_path_factory.mktemp("sites")
    return generate_federation(root, n_sites=3, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)


@pytest.fixture(scope="session")
def hostile_round(tmp_path_factory):
    """A five-site federation of the real apps warmed up, then one honest round recorded: the replies the hostile
    site's tests tamper with (test_validation, test_robust; tests/helpers/hostile.py)."""
    from tests.helpers.hostile import trained_round

    return trained_round(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="session")
def quorum_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FedsegConfig, Path, list[str]]:
    """One real Flower simulation (SuperLink, simulation engine, Ray) shared by test_simulation and
    test_tensorboard: the plain federation, no privacy option on (test_dp runs its own with central DP).

    Three tiny sites, the third with a label file that is not NIfTI, so two sites
    carry every round on the quorum; the metrics log is mirrored live to TensorBoard
    (test_tensorboard). Returns (config, run directory, shown lines).
    """
    from common.config import load_config
    from simulations.runner import run_simulation
    from simulations.synthetic import generate_federation
    from tests.helpers.tiny import tiny

    root = tmp_path_factory.mktemp("sim")
    data = root / "data"
    sites = generate_federation(data, n_sites=3, n_cases=4, shape=(32, 32, 24), seed=1)
    victim = sorted((sites["site-3"] / "labelsTr").glob("*.nii.gz"))[0]
    victim.write_bytes(b"not a nifti file")
    cfg = load_config(
        None,
        tiny(
            "federation.run_name=sim-test",
            f"federation.runs_dir={root / 'runs'}",
            "federation.rounds=2",
            "federation.min_sites=2",
            "federation.cross_eval=false",
            "simulation.num_sites=3",
            "simulation.cases_per_site=4",
            "simulation.volume_shape=[32, 32, 24]",
            "simulation.seed=1",
            f"simulation.data_dir={data}",
            "simulation.cpus_per_site=1",
            "simulation.ray_num_cpus=2",
            "train.hd95=true",
            "federation.tensorboard=true",
        ),
    )
    lines: list[str] = []
    run = run_simulation(cfg, show=lines.append)
    return cfg, run, lines


@pytest.fixture(scope="session")
def own_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Four small sites of the user's own, one of DICOM series, one held out, and the sites.yaml naming them
    (tests/helpers/own_sites.py): (sites.yaml, site name -> dataset folder)."""
    from tests.helpers.own_sites import write_own_sites

    return write_own_sites(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="session")
def own_run(own_sites: tuple[Path, dict[str, Path]]) -> Path:
    """One ``fedseg-sim run`` on ``own_sites`` (three sites train, east is held out, cross-site evaluation on),
    shared by test_own_sites, test_cross_eval and test_dicom; returns its run directory."""
    from common.config import load_config
    from simulations.cli import main as sim_main

    config, _ = own_sites
    assert sim_main(["run", "--config", str(config)]) == 0
    return Path(load_config(config).federation.runs_dir) / "own"


@pytest.fixture(scope="session")
def cyclic_run(tmp_path_factory: pytest.TempPathFactory):
    """One cyclic simulation on a Ray head started apart (tests/helpers/ray_head.py), shared by test_cyclic, which
    checks its schedule, and test_ray_cluster, which checks that it ran on the head."""
    from tests.helpers.ray_head import cyclic_run_on_head

    return cyclic_run_on_head(tmp_path_factory.mktemp("cyclic"))


@pytest.fixture(scope="session")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    """One deployed federation (tests/helpers/deployed.py), shared by test_deploy, which watches its run, and
    test_run_lineage, which runs a second run at its site daemons once the first has ended."""
    from tests.helpers.deployed import deployed_federation

    with deployed_federation(tmp_path_factory.mktemp("deploy")) as ctx:
        yield ctx


@pytest.fixture
def trained_site(tmp_path):
    """A run folder as the centre hands it out, a site that trained in it (its own norm tensors) and scans:
    (run, site.yaml, scans) of tests/helpers/run_folders.py."""
    from tests.helpers.run_folders import trained_site

    return trained_site(tmp_path)


# --- two workers (make test: pytest -n 2, pytest-xdist) ----------------------------------------------------------
#
# Two workers keep both cores busy (with one, the federations' waits on deadlines and process starts left one
# idle; with two, the cores are idle about 12 % of the time, so a third worker gains nothing). A module runs whole
# on one worker (its module fixtures are built once); modules that share an expensive session fixture run on the
# same worker, which builds it once; the modules that take minutes start first, so that both workers finish
# together.

SHARED_SESSION_FIXTURES = ("hostile_round", "quorum_run", "own_run", "deployed", "cyclic_run")
"""Session fixtures that run a federation: every module using one joins that fixture's worker."""

LONGEST_FIRST = (
    "tests/test_fault_drills.py",
    "tests/test_first_day.py",
    "tests/test_secagg_deployed.py",
    "tests/test_deploy.py",
    "tests/test_run_lineage.py",
    "tests/attacks/test_outsider.py",
)
"""The modules that take minutes (``--durations``), slowest first; the rest follow, processes and federations
first. A module missing here only starts later. test_deploy comes before test_run_lineage: both use ``deployed``, whose
first run test_deploy watches live and which test_run_lineage stops once done."""


def _module_rank(module: str, items: list[pytest.Item]) -> tuple[int, int]:
    if module in LONGEST_FIRST:
        return 0, LONGEST_FIRST.index(module)
    marks = {m.name for item in items for m in item.iter_markers()}
    return 1, 0 if "processes" in marks else 1 if "simulation" in marks else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = sorted(modules, key=lambda module: _module_rank(module, modules[module]))  # stable: ties keep order
    items[:] = [item for module in order for item in modules[module]]


def _parameters(source: str) -> set[str]:
    """Every parameter name of every function in a module: the fixtures its tests and fixtures ask for (a fixture's
    name in prose, such as "deployed", is not a request)."""
    return {
        arg.arg
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
    }


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Work units of whole modules, in collection order (``--no-loadscope-reorder``), those sharing a fixture of
    ``SHARED_SESSION_FIXTURES`` as one unit. (xdist's own ``loadgroup`` marks do not reach pytest 9's node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    @functools.cache
    def unit(module: str) -> str:
        asked = _parameters((config.rootpath / module).read_text())
        return next((name for name in SHARED_SESSION_FIXTURES if name in asked), module)

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid.split("::", 1)[0])

    return ModuleScheduling(config, log)
