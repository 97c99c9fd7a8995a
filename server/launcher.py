"""Run the coordinating centre: SuperLink, Fleet gateway and the training run, until the run ends.

Checks the certificates and the site allow-list, then starts flower-superlink
on 127.0.0.1 only (TLS, SuperNode authentication, a database file, no runtime
dependency installation, no telemetry) and the TLS Fleet gateway on
server.fleet_host:fleet_port, the one port sites reach. It registers exactly
the allow-listed sites' keys, submits the run (printing the app bundle's
SHA-256, which every site must have approved), and shows progress per round:
sites connected, sites replied, Dice. Ctrl-C or SIGTERM stops everything it
started. Starting again with the same run name resumes after the last
completed round.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import httpx

from common.cli import ROUNDS, RUN_NAME, UserError, add_allow_config_change, add_shortcuts, config_from_args
from common.config import FedsegConfig
from common.metrics_log import Event, is_kind, read_events
from common.processes import Busy, Shutdown, hold_lock, port_free, stop_on_signals, wait_healthy
from common.progress import describe
from common.runs import (
    FLWR_HOME,
    GATEWAY_LOG,
    RUN_CONFIG_TOML,
    SCRATCH_DIR,
    SERVER_LOCK,
    SUPERLINK_DATABASE,
    SUPERLINK_LOG,
    existing_run_id,
    new_run_id,
    new_run_name,
    run_dir,
)

STARTUP_TIMEOUT_S = 90.0
POLL_S = 0.5
STATUS_EVERY_S = 5.0
SIZING_CHANNELS = 32
"""Channels and classes assumed when sizing the gateway's request limit before planning has fixed them."""
RUN_END_GRACE_S = 30.0
"""How long the run may take to be marked finished after its run-end line."""


def prepare(cfg: FedsegConfig) -> FedsegConfig:
    """Name the run and make the paths the ServerApp and the SuperLink use absolute."""
    run_name = cfg.federation.run_name or new_run_name("run")
    runs_dir = Path(cfg.federation.runs_dir).resolve()
    federation = cfg.federation.replace(
        run_name=run_name,
        runs_dir=str(runs_dir),
        run_id=cfg.federation.run_id or existing_run_id(runs_dir / run_name) or new_run_id(),
    )
    server = cfg.server.replace(
        cert_dir=str(Path(cfg.server.cert_dir).resolve()), state_dir=str(Path(cfg.server.state_dir).resolve())
    )
    if server.fleet_port == server.superlink_port:
        raise UserError("server.fleet_port and server.superlink_port must differ.")
    return cfg.replace(federation=federation, server=server)


def model_bytes(cfg: FedsegConfig) -> int:
    """Bytes of the model's travelling tensors in float32: the most any one site's update can weigh."""
    from .server_app import initial_weights

    model = cfg.model  # counts the sites' data decides are taken generously: the bound only stops abuse
    sized = model.replace(
        in_channels=model.in_channels or SIZING_CHANNELS, out_channels=model.out_channels or SIZING_CHANNELS
    )
    return sum(t.numel() * 4 for t in initial_weights(cfg.replace(model=sized))[0].values())


def claim_centre(cfg: FedsegConfig) -> TextIO:
    """Refuse, before anything is submitted, when another server holds this centre's state folder or ports.

    A second ``fedseg-server start`` would otherwise submit its run into the
    live SuperLink and fail later on a port in use, deep in a shared log.
    The lock is held until the returned file is closed (or the process ends).
    """
    s = cfg.server
    try:
        lock = hold_lock(Path(s.state_dir) / SERVER_LOCK, f"fedseg-server run {cfg.federation.run_name}")
    except Busy as err:
        raise UserError(
            f"another fedseg-server is running: {err}; stop it first (Ctrl-C in its terminal, or "
            "kill that pid), or give this one another server.state_dir and ports."
        ) from err
    for host, port, what in (
        (s.fleet_host, s.fleet_port, "server.fleet_port"),
        ("127.0.0.1", s.superlink_port, "server.superlink_port"),
    ):
        if not port_free(host, port):
            lock.close()
            raise UserError(
                f"port {port} ({what}) on {host} is in use by another process; stop it (`ss -ltnp "
                f"'sport = :{port}'` names it) or set {what} to a free port."
            )
    return lock


class Centre:
    """The processes of the coordinating centre, started in order and stopped together."""

    def __init__(self, cfg: FedsegConfig, say: Callable[[str], None] = print) -> None:
        from common.flower_env import flower_env
        from common.runs import SERVER_CONFIG_ENV, SERVER_CONFIG_FILE

        from .certs import allow_list, check_server_material

        self.cfg = cfg
        self.say = say
        self.material = check_server_material(Path(cfg.server.cert_dir))
        self.keys = allow_list(Path(cfg.server.cert_dir), cfg.federation.sites)
        self.state = Path(cfg.server.state_dir)
        self.env = flower_env(self.state / FLWR_HOME)
        self.env[SERVER_CONFIG_ENV] = str(run_dir(cfg) / SERVER_CONFIG_FILE)  # inherited by the ServerApp
        self.procs: list[subprocess.Popen] = []

    def _start(self, command: list[str], log_name: str, what: str, health_url: str) -> subprocess.Popen:
        """Start one of the centre's processes, logging to ``log_name``, and return once ``health_url`` answers
        over TLS signed by the federation CA; a process that exits or stays silent is a UserError naming its log."""
        scratch = self.state / SCRATCH_DIR
        scratch.mkdir(parents=True, exist_ok=True)
        log = self.state / log_name
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                command, cwd=scratch, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        wait_healthy(
            proc,
            health_url,
            what=what,
            log=log,
            timeout_s=STARTUP_TIMEOUT_S,
            error=UserError,
            verify=str(self.material.ca_cert),
        )
        return proc

    def start_superlink(self) -> subprocess.Popen:
        from common.flower_env import flower_command
        from common.private import private_dir, private_file

        s, m = self.cfg.server, self.material
        private_file(private_dir(self.state) / SUPERLINK_DATABASE)  # node keys and messages: owner-only
        return self._start(
            [
                flower_command("flower-superlink"),
                "--ssl-certfile",
                str(m.cert),
                "--ssl-keyfile",
                str(m.key),
                "--ssl-ca-certfile",
                str(m.ca_cert),
                "--enable-supernode-auth",
                "--database",
                str(self.state / SUPERLINK_DATABASE),
                "--disable-runtime-dependency-installation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(s.superlink_port),
            ],
            SUPERLINK_LOG,
            "flower-superlink",
            f"https://127.0.0.1:{s.superlink_port}/health",
        )

    def start_gateway(self) -> subprocess.Popen:
        from .fleet_gateway import max_body

        s, m = self.cfg.server, self.material
        probe_host = "127.0.0.1" if s.fleet_host in ("0.0.0.0", "::") else s.fleet_host
        return self._start(
            [
                sys.executable,
                "-m",
                "server.fleet_gateway",
                "--listen",
                f"{s.fleet_host}:{s.fleet_port}",
                "--upstream",
                str(s.superlink_port),
                "--cert",
                str(m.cert),
                "--key",
                str(m.key),
                "--ca",
                str(m.ca_cert),
                "--max-body",
                str(max_body(model_bytes(self.cfg))),
            ],
            GATEWAY_LOG,
            "the Fleet gateway",
            f"https://{probe_host}:{s.fleet_port}/",
        )

    def stop(self) -> None:
        from common.processes import stop_tree

        for proc in reversed(self.procs):
            stop_tree(proc)


def _new_events(metrics: Path, since: float, seen: int) -> tuple[list[dict], int]:
    """Events of this launch (after its first run-start at or after ``since``) not yet shown."""
    if not metrics.is_file():
        return [], seen
    events = list(read_events(metrics))
    starts = [i for i, e in enumerate(events) if is_kind(e, Event.RUN_START) and e["time"] >= since]
    if not starts:
        return [], seen
    ours = events[starts[0] :]
    return ours[seen:], len(ours)


def follow_run(centre: Centre, control, run_id: int, metrics: Path, since: float) -> int:
    """Show progress until the run ends; returns the exit code."""
    expected = len(centre.cfg.federation.sites)
    seen, online, next_status, ended_at = 0, None, 0.0, None
    while True:
        for proc in centre.procs:
            if proc.poll() is not None:
                raise UserError(f"a server process exited (code {proc.returncode}); see the logs in {centre.state}")
        events, seen = _new_events(metrics, since, seen)
        for event in events:
            line = describe(event, expected)
            if line:
                centre.say(line)
            if is_kind(event, Event.RUN_END):
                ended_at = time.monotonic()
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + STATUS_EVERY_S
            try:
                now_online, state = control.online_sites(), control.run_state(run_id)
            except httpx.HTTPError as err:  # a busy SuperLink may drop an idle connection: ask again next time
                centre.say(f"could not ask the SuperLink for the run's state ({type(err).__name__}); retrying")
                now_online, state = online, None
            if now_online != online:
                online = now_online
                centre.say(f"sites connected: {len(online)}/{expected} ({', '.join(online) or 'none'})")
            if state is not None and state.finished:
                centre.say(f"run {run_id} {state.sub_status}{': ' + state.details if state.details else ''}")
                return 0 if ended_at is not None and state.sub_status == "completed" else 1
        if ended_at is not None and time.monotonic() - ended_at > RUN_END_GRACE_S:
            return 0
        time.sleep(POLL_S)


def start_federation(cfg: FedsegConfig, say: Callable[[str], None] = print, allow_config_change: bool = False) -> int:
    """Everything ``fedseg-server start`` does; returns the exit code."""
    import tomli_w

    from common import keys
    from common.bundle import app_dir, bundle_bytes
    from common.flower.control import ControlAPI
    from common.runs import METRICS_FILE, SERVER_CONFIG_FILE, site_view

    from .resume import ConfigChanged, last_complete_round, restarted_config
    from .site_registry import write_nodes

    cfg = prepare(cfg)
    run = run_dir(cfg)
    try:
        cfg = restarted_config(cfg, run, allow_config_change)
    except ConfigChanged as err:
        raise UserError(str(err)) from err
    lock = claim_centre(cfg)
    centre = Centre(cfg, say)
    run.mkdir(parents=True, exist_ok=True)
    run_config = {keys.RUN_CONFIG_KEY: site_view(cfg).to_yaml()}  # what every site receives
    (run / RUN_CONFIG_TOML).write_text(tomli_w.dumps(run_config))
    (run / SERVER_CONFIG_FILE).write_text(cfg.to_yaml())  # the ServerApp's, read at the centre only
    app = app_dir(cfg.server.app_dir)
    fab = bundle_bytes(app)
    done = last_complete_round(run / METRICS_FILE)
    say(f"fedseg-server: run {cfg.federation.run_name} -> {run}" + (f" (resuming after round {done})" if done else ""))
    say(
        f"app bundle sha256: {hashlib.sha256(fab).hexdigest()} from {app} (each site lists it in site.approved_bundles)"
    )
    with stop_on_signals():
        control, run_id = None, None
        try:
            centre.start_superlink()
            control = ControlAPI(cfg.server.superlink_port, centre.material.ca_cert)
            reg = control.sync_allow_list(centre.keys)
            say(
                f"allow-list: {', '.join(cfg.federation.sites)} (newly registered: {', '.join(reg.added) or 'none'}"
                f"{f'; unregistered {len(reg.removed)} unlisted key(s)' if reg.removed else ''})"
            )
            write_nodes(run, control.node_names())
            centre.start_gateway()
            say(f"sites connect to {cfg.server.fleet_host}:{cfg.server.fleet_port} (TLS; Fleet API only)")
            since = time.time()
            run_id = control.start_run(fab, run_config)
            say(f"submitted run {run_id}; waiting for sites")
            code = follow_run(centre, control, run_id, run / METRICS_FILE, since)
            run_id = None
            return code
        except Shutdown as why:
            say(f"{why} received: stopping; start again with --run-name {cfg.federation.run_name} to resume.")
            return 0
        finally:
            if control is not None and run_id is not None:
                try:
                    control.stop_run(run_id)
                except Exception:  # the SuperLink may already be gone; stopping it follows anyway
                    pass
            if control is not None:
                control.close()
            centre.stop()
            lock.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shortcuts(parser, RUN_NAME, ROUNDS)
    add_allow_config_change(parser)


def run(args: argparse.Namespace) -> int:
    return start_federation(config_from_args(args), allow_config_change=args.allow_config_change)
