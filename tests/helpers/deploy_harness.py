"""Building blocks for the deployment tests: a PKI, sites with keys, and real processes.

Everything runs as the real commands (``fedseg-server start``, ``fedseg-client
start``) in their own sessions on 127.0.0.1 with free ports, and is stopped
with its whole process tree.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from common.files import read_jsonl
from common.flower_env import BIN_DIR, free_port
from common.processes import descendants, stop_tree
from common.runs import METRICS_FILE, existing_run_id
from tests.helpers.tiny import TINY

GATEWAY_HOST = "127.0.0.2"
"""Sites use a different loopback address than the SuperLink, standing in for the centre's public interface."""


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(command: str, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN_DIR / command), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def federation_yaml(
    root: Path,
    app: Path,
    sites: list[str],
    rounds: int,
    min_sites: int,
    run_name: str,
    train: dict | None = None,
    **federation: object,
) -> Path:
    """The centre's federation.yaml: the TINY model, ``train`` settings over TINY's, ``federation`` options."""
    server = {
        "fleet_host": GATEWAY_HOST,
        "fleet_port": free_port(GATEWAY_HOST),
        "superlink_port": free_port(),
        "cert_dir": str(root / "certs"),
        "state_dir": str(root / "server-state"),
        "app_dir": str(app),
    }
    fed = {
        "rounds": rounds,
        "min_sites": min_sites,
        "sites": sites,
        "runs_dir": str(root / "runs"),
        "run_name": run_name,
        "round_timeout_s": 120.0,
        **federation,
    }
    return write_yaml(
        root / "federation.yaml",
        {**TINY, "train": {**TINY["train"], **(train or {})}, "federation": fed, "server": server},
    )


def make_site(
    root: Path,
    name: str,
    data_dir: Path,
    server_yaml: Path,
    approved: list[str],
    min_cohort: int | None = 1,
    **options: object,
) -> Path:
    """site.yaml (``options`` override site.* settings) plus a fresh key pair.

    ``min_cohort`` is 1 so that a few synthetic cases score every round; None leaves it out, as a hospital's
    site.yaml does (the deployed default).
    """
    server = yaml.safe_load(server_yaml.read_text())["server"]
    state = root / "sites" / name
    site = {
        "name": name,
        "data_dir": str(data_dir),
        "state_dir": str(state),
        "server_address": f"{server['fleet_host']}:{server['fleet_port']}",
        "root_certificate": str(Path(server["cert_dir"]) / "ca.crt"),
        "private_key": str(state / "keys" / "site.key"),
        "approved_bundles": approved,
        "retry_initial_s": 1.0,
        "retry_max_s": 4.0,
        **({} if min_cohort is None else {"min_cohort": min_cohort}),
        **options,
    }
    path = write_yaml(root / f"{name}.yaml", {"site": site})
    result = run_cli("fedseg-client", "keygen", "--config", str(path))
    assert result.returncode == 0, result.stderr
    return path


def allow(server_yaml: Path, site: str, site_yaml: Path) -> None:
    key = Path(yaml.safe_load(site_yaml.read_text())["site"]["private_key"])
    result = run_cli(
        "fedseg-server",
        "certs",
        "add-site",
        "--config",
        str(server_yaml),
        "--site",
        site,
        "--key",
        str(key.with_name(key.name + ".pub")),
    )
    assert result.returncode == 0, result.stderr


class Launched:
    """A fedseg command running in its own session, its output in a file."""

    def __init__(self, log: Path, command: str, *args: str) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN_DIR / command), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM the command itself, as systemd would, and wait for it to clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        stop_tree(self.proc)
        return self.proc.returncode

    def kill_tree(self) -> None:
        """SIGKILL the command and everything under it at once, like a power cut."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, *logs: Launched, poll_s: float = 0.5
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    tails = "\n".join(f"--- {log.log}\n{log.output()[-3000:]}" for log in logs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def events(run: Path) -> list[dict]:
    return list(read_jsonl(run / METRICS_FILE))


def site_norm_files(state_dir: Path, run: Path) -> list[Path]:
    """A site's norm tensors of the run in folder ``run``, one file per round it trained, oldest first."""
    from client.site_state import SiteState

    kept = SiteState(state_dir).run_named(run.name, existing_run_id(run))
    return [kept.norm_path(r) for r in kept.rounds()]


def snapshot_app(dest: Path) -> tuple[Path, str]:
    """A frozen copy of the app's files and its bundle digest, immune to edits of the working tree."""
    from common.bundle import bundle_sha256, write_app

    return write_app(dest), bundle_sha256(dest)


class TcpProxy:
    """A TCP relay between a site and the gateway that a drill can cut (like a dropped link) and restore.

    It listens on ``host`` (the gateway's address, so the server certificate
    still matches) and forwards every connection to ``upstream``. ``cut()``
    resets every open connection and stops listening (new connections are
    refused) until ``restore()`` listens on the same port again.
    """

    def __init__(self, host: str, upstream: tuple[str, int]) -> None:
        self.host, self.upstream = host, upstream
        self.port = 0
        self.cuts = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server((self.host, self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                down, _ = listener.accept()
            except OSError:  # cut: the listener is closed
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._open += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """Refuse new connections and reset the open ones, as a dropped link does."""
        self.cuts += 1
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            doomed, self._open = self._open, []
        for sock in doomed:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
