"""Run this hospital's site: a long-running SuperNode that joins the federation over TLS.

Checks site.yaml, the site's certificate and key, and every case of its data
(the same check as `fedseg-client check`, run in a child of the warm parent
below, so that the daemon itself never loads torch or MONAI) first; each
refusal names the file and the fix. Then it starts flower-supernode with the federation's CA
certificate, the site's private key and its node config, behind the app-bundle
guard (only bundles listed in site.approved_bundles run). Before each start it
opens one TLS connection to the server itself: a server certificate that the
site's CA did not issue is said in plain words and retried with back-off,
without starting a SuperNode that would retry it silently. Each ClientApp
process is forked from a warm parent that has torch, MONAI and Flower loaded
(client/warm_start.py), and the SuperNode polls every site.poll_interval_s
(client/supernode.py). If the SuperNode
stops, for instance while the server is down, it is restarted with exponential
back-off. Stop it with Ctrl-C or SIGTERM: everything it started is stopped.
The site's local normalization tensors and data cache live in site.state_dir
and survive restarts and reboots.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from common.cli import UserError, config_from_args
from common.config import FedsegConfig, SiteConfig
from common.files import atomic_write_text
from common.runs import BUNDLE_LOG, DAEMON_FILE, FLWR_HOME, GUARD_BIN, RESOLVED_SITE, SUPERNODE_LOG, WARM_LOG

from .watch import PROBLEMS, SiteWatch

STABLE_RUN_S = 120.0
"""A SuperNode that ran this long counts as healthy: the next restart waits retry_initial_s again."""
POLL_S = 0.5
WARM_READY_S = 300.0
"""How long the data check waits for the warm parent to finish its imports before checking in the daemon."""
TLS_CHECK_TIMEOUT_S = 10.0


LOG_TAIL_BYTES = 20_000


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def resolve_site(cfg: FedsegConfig) -> SiteConfig:
    """The site section with every path absolute, after checking it is complete."""
    site = cfg.site
    required = ("name", "data_dir", "state_dir", "server_address", "root_certificate", "private_key")
    missing = [k for k in required if not getattr(site, k)]
    if missing:
        raise UserError(f"site.yaml lacks site.{', site.'.join(missing)}; see deploy/site.yaml for each option.")
    if ":" not in site.server_address:
        raise UserError(f"site.server_address '{site.server_address}' must be host:port of the centre's gateway.")
    if not site.approved_bundles:
        raise UserError(
            "site.approved_bundles is empty, so every app bundle would be refused; add the digest "
            "printed by `fedseg-client approve` for the release this site has reviewed."
        )
    from .bundle_guard import parse_approved

    try:
        parse_approved(site.approved_bundles)
    except ValueError as err:
        raise UserError(f"site.approved_bundles: {err}") from None
    if not Path(site.data_dir).is_dir():
        raise UserError(f"site.data_dir {site.data_dir} is not a folder; point it at the site's dataset.")
    return site.replace(
        data_dir=_absolute(site.data_dir),
        state_dir=_absolute(site.state_dir),
        root_certificate=_absolute(site.root_certificate),
        private_key=_absolute(site.private_key),
    )


def check_material(site: SiteConfig) -> None:
    """Refuse an unusable CA certificate or private key before Flower gives a vaguer error."""
    from common.pki import load_certificate, load_node_private_key, require_ca

    ca_path = Path(site.root_certificate)
    ca = load_certificate(ca_path, "federation CA certificate", "ask the coordinating centre for its ca.crt.")
    require_ca(ca, ca_path)
    load_node_private_key(Path(site.private_key))


def supernode_command(site: SiteConfig, site_yaml: Path, runtime_port: int) -> list[str]:
    """Flower's flower-supernode, run through client/supernode.py for the site's poll interval."""
    from common.keys import NODE_SITE_CONFIG

    return [
        sys.executable,
        "-m",
        "client.supernode",
        "--superlink",
        site.server_address,
        "--root-certificates",
        site.root_certificate,
        "--auth-supernode-private-key",
        site.private_key,
        "--node-config",
        f'{NODE_SITE_CONFIG}="{site_yaml}"',
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]


def prepare_state(site: SiteConfig) -> tuple[Path, dict[str, str]]:
    """The resolved site.yaml the ClientApp reads, and the environment of the SuperNode and the warm parent.

    The ``flwr-clientapp`` launcher first on the SuperNode's PATH starts each
    ClientApp from the site's warm parent (client/warm_start.py), behind the
    bundle guard either way.
    """
    from common.flower_env import SITE_ENV, flower_env
    from common.private import private_dir

    from .bundle_guard import guard_env, write_launcher
    from .supernode import POLL_ENV
    from .warm_start import SOCKET_ENV, new_socket_name

    state = private_dir(site.state_dir)  # owner-only before the SuperNode or any ClientApp writes into it
    site_yaml = state / RESOLVED_SITE
    site_yaml.write_text(yaml.safe_dump({"site": site.to_dict()}, sort_keys=False))
    bin_dir = write_launcher(state / GUARD_BIN, entry="client.warm_start").parent
    env = flower_env(state / FLWR_HOME, site.torch_threads) | SITE_ENV
    env[POLL_ENV] = str(site.poll_interval_s)
    if site.warm_start:
        env[SOCKET_ENV] = new_socket_name()
    return site_yaml, guard_env(bin_dir, site.approved_bundles, state / BUNDLE_LOG, env)


def tls_problem(site: SiteConfig) -> str | None:
    """Why the server's certificate is not trusted by this site's CA, or None (trusted, or not reachable now).

    An unreachable server is the SuperNode's to retry; only a certificate the
    site cannot verify is a reason not to start one.
    """
    host, port = site.server_address.rsplit(":", 1)
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=site.root_certificate)
    try:
        with socket.create_connection((host, int(port)), timeout=TLS_CHECK_TIMEOUT_S) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as err:
        return (
            f"{PROBLEMS['CERTIFICATE_VERIFY_FAILED']} ({site.root_certificate}; {err.verify_message}, "
            "CERTIFICATE_VERIFY_FAILED): get the federation's ca.crt from the centre"
        )
    except OSError:
        return None


def diagnose(log_path: Path) -> str:
    """A one-line reason for the SuperNode's exit, from the end of its log."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - LOG_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = [why for phrase, why in PROBLEMS.items() if phrase in tail]
    return f" ({found[-1]})" if found else ""


class Daemon:
    """Keeps one SuperNode running for this site until told to stop."""

    def __init__(self, site: SiteConfig, say: Callable[[str], None] = print) -> None:
        self.site = site
        self.say = say
        self.state = Path(site.state_dir)
        self.proc: subprocess.Popen | None = None
        self.warm: subprocess.Popen | None = None
        """The warm parent of the ClientApp processes (client/warm_start.py)."""

    def _spawn(self, command: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen:
        with (self.state / log_name).open("ab") as log_file:
            return subprocess.Popen(
                command, cwd=self.state, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _ensure_warm(self, env: dict[str, str]) -> None:
        if self.site.warm_start and (self.warm is None or self.warm.poll() is not None):  # meanwhile: cold starts
            self.warm = self._spawn([sys.executable, "-m", "client.warm_start"], env, WARM_LOG)

    def _verdict_in_child(self, env: dict[str, str]) -> dict | None:
        """The data check's verdict from a child of the warm parent, so that this long-running daemon never
        loads torch or MONAI (client/warm_start.py); None without a warm parent that answers."""
        from .warm_start import SOCKET_ENV, check_in_child

        self._ensure_warm(env)
        deadline = time.monotonic() + WARM_READY_S
        while self.warm is not None and self.warm.poll() is None and time.monotonic() < deadline:
            try:
                return check_in_child(env[SOCKET_ENV], self.site.data_dir)
            except ConnectionRefusedError:  # still importing: it listens once ready
                time.sleep(POLL_S)
            except OSError:  # it went away in the middle of the check
                return None
        return None

    def _start(self, site_yaml: Path, env: dict[str, str]) -> subprocess.Popen:
        from common.flower_env import free_port

        self._ensure_warm(env)
        port = self.site.runtime_port or free_port()
        return self._spawn(supernode_command(self.site, site_yaml, port), env, SUPERNODE_LOG)

    def _write_status(self, **fields: object) -> None:
        atomic_write_text(self.state / DAEMON_FILE, json.dumps({"pid": os.getpid(), "time": time.time(), **fields}))

    def serve(self, max_starts: int | None = None) -> int:
        """Run, restart with back-off, return 0 on SIGTERM/SIGINT; ``max_starts`` bounds restarts (tests)."""
        from common.processes import Shutdown, stop_on_signals, stop_tree

        site_yaml, env = prepare_state(self.site)
        with stop_on_signals():
            delay, starts = self.site.retry_initial_s, 0
            try:
                check_data(self.site, self.say, lambda: self._verdict_in_child(env))
                while max_starts is None or starts < max_starts:
                    starts += 1
                    if problem := tls_problem(self.site):
                        self._write_status(state="waiting", problem=problem, retry_in_s=delay)
                        self.say(
                            f"site {self.site.name}: not joining {self.site.server_address}: {problem}; "
                            f"checking again in {delay:.0f} s"
                        )
                        time.sleep(delay)
                        delay = min(delay * 2, self.site.retry_max_s)
                        continue
                    self.proc = self._start(site_yaml, env)
                    started = time.monotonic()
                    running = {
                        "state": "running",
                        "supernode_pid": self.proc.pid,
                        "starts": starts,
                        "warm_pid": self.warm.pid if self.warm else None,
                        "server": self.site.server_address,
                    }
                    self._write_status(**running)
                    self.say(
                        f"site {self.site.name}: SuperNode started (pid {self.proc.pid}), joining "
                        f"{self.site.server_address}; log: {self.state / SUPERNODE_LOG}"
                    )
                    watch = SiteWatch(self.state, self.site.server_address)
                    while self.proc.poll() is None:
                        if said := watch.poll():
                            for line in said:
                                self.say(f"site {self.site.name}: {line}")
                            self._write_status(**running, watch=watch.as_dict())
                        time.sleep(POLL_S)
                    if time.monotonic() - started > STABLE_RUN_S:
                        delay = self.site.retry_initial_s
                    stop_tree(self.proc)
                    self._write_status(state="waiting", exit_code=self.proc.returncode, retry_in_s=delay)
                    self.say(
                        f"site {self.site.name}: SuperNode exited with code {self.proc.returncode}"
                        f"{diagnose(self.state / SUPERNODE_LOG)}; restarting in {delay:.0f} s "
                        f"(see {self.state / SUPERNODE_LOG})"
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, self.site.retry_max_s)
                return 1
            except Shutdown as why:
                self.say(f"site {self.site.name}: {why} received; stopping the SuperNode.")
                return 0
            finally:
                stop_tree(self.proc)
                stop_tree(self.warm)
                self._write_status(state="stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="Shortcut for --set site.server_address=HOST:PORT.")


def check_data(
    site: SiteConfig, say: Callable[[str], None] = print, in_child: Callable[[], dict | None] = lambda: None
) -> None:
    """Run `fedseg-client check` on the site's data; a broken case stops the daemon before it joins.

    ``in_child`` gives the report's verdict computed elsewhere (Daemon: in a child of the warm parent), or None;
    then the check runs here.
    """
    say(f"site {site.name}: checking every case in {site.data_dir} before joining ...")
    verdict = in_child()
    if verdict is None:
        from .check import check_dataset

        verdict = check_dataset(site.data_dir).verdict()
    if not verdict["ok"]:
        raise UserError(f"site {site.name} will not join: {verdict['message']}")
    say(str(verdict["table"]))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, [f"site.server_address={args.server}"] if args.server else [])
    site = resolve_site(cfg)
    check_material(site)
    return Daemon(site).serve()
