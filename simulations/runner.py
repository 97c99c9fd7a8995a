"""The local multi-site simulation: the deployment's apps on Flower's simulation engine.

``run_simulation`` takes the user's own sites (``simulation.sites``) or
generates (or reuses) the synthetic ones, writes one
site.yaml per simulated site into the run directory, starts a private
SuperLink in simulation mode, submits the app bundle's files (the deployment's, copied into the run's
``app/``) with ``flwr run`` and follows
the metrics log to show progress per round. Whatever it starts it stops, also
on Ctrl-C or an error: no SuperLink, simulation or Ray process outlives it.

Flower 1.42 details handled here: the SuperLink runs with its own FLWR_HOME
(so the user's ~/.flwr and pyproject's legacy ``[tool.flwr.federations]`` are
never read or rewritten), from a scratch working directory (it would import
code from the directory it was started in), with runtime dependency
installation and telemetry disabled.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w
import yaml

from common import keys
from common.bundle import app_dir, write_app
from common.config import NORM_TRAVEL, FedsegConfig, SiteConfig, SiteFile, load_config
from common.flower_env import flower_command, flower_env, free_port
from common.metrics_log import Event, read_events
from common.processes import stop_tree, wait_healthy
from common.progress import describe
from common.runs import (
    FLOWER_CONFIG,
    FLWR_HOME,
    FLWR_RUN_LOG,
    METRICS_FILE,
    RUN_CONFIG_TOML,
    SCRATCH_DIR,
    SERVER_CONFIG_ENV,
    SERVER_CONFIG_FILE,
    SIM_APP_DIR,
    SIM_SITES_DIR,
    SUPERLINK_LOG,
    existing_run_id,
    new_run_id,
    new_run_name,
    run_dir,
    simulated_site_config,
    site_view,
)
from server.resume import ConfigChanged, restarted_config
from server.server_app import first_failure

from .sites import read_site_specs, site_datasets, site_names, with_data_channels

log = logging.getLogger("fedseg.sim")

CONNECTION = "fedseg-sim"
STARTUP_TIMEOUT_S = 60.0
POLL_S = 0.5
RAY_ADDRESS = "RAY_ADDRESS"
FINISH_GRACE_S = 30.0
"""How long `flwr run --stream` may take to notice the run has ended."""


class SimulationError(RuntimeError):
    """The simulation could not run to completion; the message names the log to read."""


class RunFailed(SimulationError):
    """The run ended, but failed (no site trained, planning failed): the message gives the first reason."""


def prepare_run(cfg: FedsegConfig) -> FedsegConfig:
    """Name the run, make every path absolute and list the simulated sites."""
    sim = cfg.simulation
    run_name = cfg.federation.run_name or new_run_name("sim")
    names, held_out = site_names(cfg)
    federation = cfg.federation.replace(
        run_name=run_name,
        runs_dir=str(Path(cfg.federation.runs_dir).resolve()),
        run_id=cfg.federation.run_id or existing_run_id(Path(cfg.federation.runs_dir) / run_name) or new_run_id(),
        sites=names,
        held_out_sites=held_out,
        min_sites=min(cfg.federation.min_sites, len(names)),
    )
    simulation = sim.replace(data_dir=str(Path(sim.data_dir).resolve()))
    return cfg.replace(federation=federation, simulation=simulation)


def site_state_dir(run: Path, name: str) -> Path:
    """A simulated site's private state folder (norm tensors, cache, egress log, pictures)."""
    return Path(run) / SIM_SITES_DIR / name


SYNTHETIC_RELAXED = {"min_cohort": 1}
"""What synthetic sites relax from a deployed site's defaults: their few generated cases protect no patient."""


def relaxed_settings(cfg: FedsegConfig, name: str) -> tuple[dict, list[str]]:
    """One simulated site's ``site:`` settings (no paths yet), and what they relax from a deployed site's defaults.

    A deployed site's defaults apply unless the site names its own site.yaml
    (``simulation.sites.<name>.site_yaml``); synthetic sites relax only what
    their size forces, and a run whose norm_mode lets more travel than a
    site's default allows relaxes that one setting. Each relaxation is said.
    """
    own = cfg.simulation.sites.get(name)
    settings: dict = {"torch_threads": cfg.simulation.cpus_per_site}
    relaxed = []
    if own is not None and own.site_yaml:
        settings |= load_config(Path(own.site_yaml), schema=SiteFile).site.to_dict()
    elif own is None:
        settings |= SYNTHETIC_RELAXED
        relaxed += [f"site.{k}: {v}" for k, v in SYNTHETIC_RELAXED.items()]
    travel = settings.get("max_norm_travel", SiteConfig().max_norm_travel)
    if NORM_TRAVEL.index(cfg.train.norm_mode) > NORM_TRAVEL.index(travel):
        settings["max_norm_travel"] = cfg.train.norm_mode
        relaxed.append(f"site.max_norm_travel: {cfg.train.norm_mode}")
    return settings, relaxed


def write_site_configs(cfg: FedsegConfig, datasets: dict[str, Path]) -> list[str]:
    """One site.yaml per simulated site (partition i: the i-th site), as a hospital would write it; returns
    one line per site whose settings differ from a deployed site's defaults."""
    notes = []
    for index, (name, data_dir) in enumerate(datasets.items()):
        path = simulated_site_config(run_dir(cfg) / SIM_SITES_DIR, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings, relaxed = relaxed_settings(cfg, name)
        settings |= {"name": name, "data_dir": str(data_dir), "state_dir": str(site_state_dir(run_dir(cfg), name))}
        path.write_text(yaml.safe_dump({"site": settings}, sort_keys=False))
        if relaxed:
            notes.append(f"{name}: {', '.join(relaxed)}")
    return notes


class LocalSuperLink:
    """A private SuperLink in simulation mode, stopped with everything it spawned."""

    def __init__(self, run: Path, threads: int, ray_address: str = "") -> None:
        self.run = run
        self.home = run / FLWR_HOME
        self.port = free_port()
        self.env = flower_env(self.home, threads)
        self.env[SERVER_CONFIG_ENV] = str(run / SERVER_CONFIG_FILE)  # inherited by the ServerApp
        # Flower 1.42's federation config has no Ray address; ray.init() reads RAY_ADDRESS, and the
        # simulation process inherits the SuperLink's environment.
        self.env.pop(RAY_ADDRESS, None)
        if ray_address:
            self.env[RAY_ADDRESS] = ray_address
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalSuperLink:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / FLOWER_CONFIG).write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True},
                    },
                }
            )
        )
        command = [
            flower_command("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
            "--log-file",
            str(self.run / SUPERLINK_LOG),
        ]
        scratch = self.home / SCRATCH_DIR
        scratch.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            command,
            cwd=scratch,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_healthy(
            self.proc,
            f"http://127.0.0.1:{self.port}/health",
            what="flower-superlink",
            log=self.run / SUPERLINK_LOG,
            timeout_s=STARTUP_TIMEOUT_S,
            error=SimulationError,
            require_success=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        stop_tree(self.proc)


def follow(path: Path, seen: int, show: Callable[[str], None]) -> int:
    """Show events appended since the last call; returns how many have been seen."""
    if not path.is_file():
        return seen
    events = list(read_events(path))
    for event in events[seen:]:
        line = describe(event)
        if line:
            show(line)
    return len(events)


def federation_config(cfg: FedsegConfig, num_sites: int) -> str:
    """Flower's simulation settings: sites, each site's CPU and GPU share, and the local Ray's size.

    Joining a running cluster, Ray refuses a CPU count: the cluster has its own.
    """
    sim = cfg.simulation
    settings = (
        f"num-supernodes={num_sites} client-resources-num-cpus={sim.cpus_per_site} "
        f"client-resources-num-gpus={sim.gpus_per_site}"
    )
    return settings if sim.ray_address else f"{settings} init-args-num-cpus={sim.ray_num_cpus}"


def run_simulation(cfg: FedsegConfig, show: Callable[[str], None] = print, allow_config_change: bool = False) -> Path:
    """Run the simulation described by ``cfg``; returns the run directory.

    A run that was started before resumes with its own configuration
    (server/resume.py); a run in which no site trained raises SimulationError
    with the first reason.
    """
    cfg = prepare_run(cfg)
    sim = cfg.simulation
    run = run_dir(cfg)
    try:
        cfg = restarted_config(cfg, run, allow_config_change)
    except ConfigChanged as err:
        raise SimulationError(str(err)) from err
    refuse_missing_gpu(cfg)
    datasets = site_datasets(cfg)
    cfg = with_data_channels(cfg, read_site_specs(datasets))
    run.mkdir(parents=True, exist_ok=True)
    held = f" (+{len(cfg.federation.held_out_sites)} held out)" if cfg.federation.held_out_sites else ""
    show(f"fedseg-sim: {len(cfg.federation.sites)} sites{held}, {cfg.federation.rounds} rounds -> {run}")
    if notes := write_site_configs(cfg, datasets):
        show(f"fedseg-sim: unlike a deployed site's defaults: {'; '.join(notes)}")
    run_config = run / RUN_CONFIG_TOML  # what a deployed site receives, plus where the simulated sites' yaml lie
    run_config.write_text(
        tomli_w.dumps({keys.RUN_CONFIG_KEY: site_view(cfg).to_yaml(), keys.SIM_SITES_KEY: str(run / SIM_SITES_DIR)})
    )
    (run / SERVER_CONFIG_FILE).write_text(cfg.to_yaml())  # the ServerApp's, as at a deployed centre
    app = write_app(run / SIM_APP_DIR, app_dir(cfg.server.app_dir))  # the release a centre would submit
    metrics = run / METRICS_FILE
    threads = sim.cpus_per_site
    with LocalSuperLink(run, threads, sim.ray_address) as link, (run / FLWR_RUN_LOG).open("w") as flwr_log:
        submit = subprocess.Popen(
            [
                flower_command("flwr"),
                "run",
                str(app),
                CONNECTION,
                "--run-config",
                str(run_config),
                "--federation-config",
                federation_config(cfg, len(datasets)),
                "--stream",
            ],
            env=link.env,
            stdout=flwr_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        seen, finished_at = 0, None
        try:
            while submit.poll() is None:
                seen = follow(metrics, seen, show)
                if finished_at is None and _finished(metrics):
                    finished_at = time.monotonic()
                if finished_at is not None and time.monotonic() - finished_at > FINISH_GRACE_S:
                    break
                time.sleep(POLL_S)
            seen = follow(metrics, seen, show)
        finally:
            stop_tree(submit)
    if not _finished(metrics):
        raise SimulationError(f"the run ended without finishing; see {run / FLWR_RUN_LOG} and {run / SUPERLINK_LOG}")
    status = list(read_events(metrics, Event.RUN_END))[-1]["status"]
    if status.startswith("failed"):
        raise RunFailed(f"the run {status}; {first_failure(run)}; the metrics log {metrics} has every failure")
    draw_site_pictures(run, len(datasets), show)
    return run


def refuse_missing_gpu(cfg: FedsegConfig) -> None:
    """A device that cannot work on this machine is refused before anything starts, not in every site's log.

    Every simulated site runs here, so a CUDA device this machine lacks would
    fail every site in every round.
    """
    if not cfg.simulation.ray_address and (cfg.train.device.startswith("cuda") or cfg.simulation.gpus_per_site > 0):
        import torch

        if not torch.cuda.is_available():
            raise SimulationError(
                f"train.device is {cfg.train.device} (simulation.gpus_per_site "
                f"{cfg.simulation.gpus_per_site}) but torch sees no CUDA GPU on this machine; set "
                "train.device=auto (the GPU when there is one) or cpu, and gpus_per_site 0."
            )


def draw_site_pictures(run: Path, n_sites: int, show: Callable[[str], None]) -> None:
    """Each simulated site draws a validation case with the last model into its own folder.

    This is what ``fedseg-client report`` does at a hospital: the pictures are
    made from the site's data on the machine that holds it and never travel.
    A site whose data cannot be drawn is skipped with a note.
    """
    from client.site_report import site_pictures

    for index in range(n_sites):
        site_cfg = load_config(simulated_site_config(run / SIM_SITES_DIR, index), schema=SiteFile)
        try:
            paths = site_pictures(site_cfg, run, show=lambda line: show(f"  {line}"))
        except Exception as err:  # a picture is a convenience; the run's results stand without it
            log.warning("no picture for site %s: %s", site_cfg.site.name, err)
            show(f"  picture   {site_cfg.site.name:<10} skipped: {str(err).splitlines()[0]}")
            continue
        for path in paths:
            show(f"  picture   {site_cfg.site.name:<10} {path}")


def _finished(metrics: Path) -> bool:
    return metrics.is_file() and any(read_events(metrics, Event.RUN_END))
