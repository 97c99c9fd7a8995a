"""ClientApp processes that start in milliseconds: a warm parent with the libraries imported, forked per task.

Flower 1.42 starts one ``flwr-clientapp`` process per message, and a fresh
interpreter spends seconds importing torch, MONAI and Flower before any work.
The site daemon therefore keeps one *warm parent* per site: a process that has
imported those third-party libraries and nothing of fedseg's (the code of an
app bundle must come from the bundle, after the guard accepted it).

Flower still starts ``flwr-clientapp`` for every task; the launcher that the
daemon puts first on the SuperNode's PATH is :func:`main`. It hands its
arguments, environment and standard streams to the warm parent over a
local socket, the warm parent forks, and the child runs exactly what a cold
launcher runs: the bundle guard (client/bundle_guard.py), which checks the
bundle before Flower installs or imports it, then Flower's ClientApp runner.
Each task still gets its own process, which exits when the task ends. The
launcher waits for the child, forwards SIGTERM/SIGINT to it and returns its
exit code. If the warm parent is not there, the launcher runs the guard
itself, as before (a cold start).

The site daemon's data check runs the same way (:func:`check_in_child`), so
that the daemon, which runs as long as the site does, never loads torch or
MONAI itself: the child imports the installed checker, writes the report's
verdict to a pipe the daemon passed, and exits; the warm parent stays clean.

The guard's approved list and decision log are the warm parent's own,
set by the daemon; whatever a caller sends in its environment for them is
ignored. The socket is in Linux's abstract namespace under a random name
per daemon start, and each side checks that the other runs as the same user.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback

from common.flower.clientapp_runner import RUNNER_MODULES

SOCKET_ENV = "FEDSEG_WARM_SOCKET"
"""Abstract Unix socket name of this site's warm parent, handed to the launcher by the daemon."""
PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",
    "monai",
    "nibabel",
    "safetensors.torch",
    "yaml",
    "flwr.app",
    "flwr.clientapp",
    *RUNNER_MODULES,
)
"""Third-party modules a ClientApp needs; importing them once is what makes a task start fast.

``torch._dynamo`` is not imported by ``import torch``: the first optimizer a
process builds imports it, which took 7 of the 7.5 s of a tiny training round
in a fresh process on a loaded 2-core machine.
"""
OWN_PACKAGES = ("common", "server", "simulations")
"""fedseg packages that must not be loaded in the warm parent: the bundle brings its own."""
MAX_REQUEST = 1 << 20
REAP_EVERY_S = 0.05
CHECK_TASK = "check"
"""A request's ``task`` for the daemon's data check; any other request is a ClientApp task."""
PROCESS_STARTED_ENV = "FEDSEG_PROCESS_STARTED_AT"
"""Timeline (client/timeline.py): the Unix time the launcher started."""


def new_socket_name() -> str:
    """A fresh, unguessable socket name per daemon start, so no other process can take it first."""
    import secrets

    return f"fedseg-clientapp-{secrets.token_hex(12)}"


def _address(name: str) -> str:
    """The abstract-namespace address of ``name`` (Linux): no file to clean up, no path length limit."""
    return "\0" + name


# --- the launcher --------------------------------------------------------------------------------


def main() -> int:
    """Entry point of the ``flwr-clientapp`` launcher: a warm start if possible, else a cold one."""
    started = repr(time.time())
    name = os.environ.get(SOCKET_ENV)
    code = _warm(name, started) if name else None
    if code is not None:
        return code
    from .bundle_guard import main as guarded_clientapp

    os.environ[PROCESS_STARTED_ENV] = started
    quicken_flower()
    return guarded_clientapp()


def _warm(name: str, started: str) -> int | None:
    """The exit code of the task run by a child of the warm parent; None if no warm parent took it (start cold)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        try:
            conn.connect(_address(name))
            if not _peer_is_us(conn):  # someone else's socket: never hand it the task's token
                return None
            request = {"argv": sys.argv, "env": {**os.environ, PROCESS_STARTED_ENV: started}, "cwd": os.getcwd()}
            socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
            child = _read_int(conn)
        except OSError:
            return None

        def forward(signum: int, frame: object) -> None:
            os.kill(child, signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        try:
            return _read_int(conn)
        except OSError:  # the warm parent went away while its child ran: the task is not run twice
            return 1


def check_in_child(name: str, data_dir: str) -> dict | None:
    """The verdict of ``fedseg-client check`` on ``data_dir`` (CheckReport.verdict), computed in a child of the warm
    parent on socket ``name``; None if the child failed (the caller checks itself).

    Raises ConnectionRefusedError while no warm parent listens on ``name`` (it binds once its imports are done).
    """
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(_address(name))
            if not _peer_is_us(conn):
                return None
            socket.send_fds(conn, [json.dumps({"task": CHECK_TASK, "data_dir": data_dir}).encode()], [write_end])
            os.close(write_end)
            write_end = -1
            _read_int(conn)  # the child's pid
            with os.fdopen(read_end, "rb") as pipe:
                read_end = -1
                said = pipe.read()
            code = _read_int(conn)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    return json.loads(said) if code == 0 else None


def _read_int(conn: socket.socket) -> int:
    data = conn.recv(8)
    if len(data) != 8:
        raise ConnectionError("the warm parent went away")
    return struct.unpack("!q", data)[0]


# --- the warm parent ---------------------------------------------------------------------------


def quicken_flower() -> None:
    """Flower's object pulls without its seconds-long back-off (common/flower/object_pulls.py), before any bundle code.

    ``common`` is forgotten again afterwards, so that the bundle's own copy is
    the one its code imports.
    """
    from common.flower.object_pulls import quicken_object_pulls

    quicken_object_pulls()
    for module in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[module]


def _preload() -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    quicken_flower()
    own = sorted(m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES)
    if own:
        raise RuntimeError(f"the warm parent loaded fedseg modules {own[:5]}; bundle code must come from the bundle")


def _peer_is_us(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == os.getuid()


def _default_signals() -> None:
    """A forked child leaves the warm parent's signal handling behind."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _run_check(request: dict, fds: list[int]) -> None:
    """In the forked child: check the dataset and write the report's verdict to the daemon's pipe."""
    code = 1
    try:
        _default_signals()
        from .check import check_dataset

        verdict = check_dataset(request["data_dir"]).verdict()
        with os.fdopen(fds[0], "w") as pipe:
            json.dump(verdict, pipe)
        code = 0
    except BaseException:  # a child must never return into the parent's loop
        traceback.print_exc()
    finally:
        os._exit(code)


def _run_child(request: dict, fds: list[int], guard_env: dict[str, str]) -> None:
    """In the forked child: become the launcher's ClientApp process and run the guarded Flower runner."""
    code = 1
    try:
        _default_signals()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(guard_env)
        sys.argv = list(request["argv"])
        from .bundle_guard import main as guarded_clientapp

        code = guarded_clientapp()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # a child must never return into the parent's loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def serve(name: str) -> None:
    """Accept launchers on socket ``name`` until killed; each gets a forked child, then the child's exit code."""
    from .bundle_guard import APPROVED_ENV, DECISIONS_ENV

    _preload()
    guard_env = {k: os.environ.get(k, "") for k in (APPROVED_ENV, DECISIONS_ENV)}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(_address(name))
    listener.listen(16)
    children: dict[int, socket.socket] = {}
    print(f"fedseg warm parent ready (pid {os.getpid()}): {len(PRELOAD)} libraries loaded", flush=True)
    while True:
        ready, _, _ = select.select([listener], [], [], REAP_EVERY_S)
        if ready:
            conn, _ = listener.accept()
            try:
                if not _peer_is_us(conn):
                    conn.close()
                    continue
                payload, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
                request = json.loads(payload)
            except (OSError, ValueError):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                conn.close()
                if request.get("task") == CHECK_TASK:
                    _run_check(request, fds)
                else:
                    _run_child(request, fds, guard_env)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            _send_int(conn, pid)
        _reap(children)


def _send_int(conn: socket.socket, value: int) -> None:
    try:
        conn.send(struct.pack("!q", value))
    except OSError:
        pass  # the launcher is gone; its child runs on and is reaped as usual


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send_int(conn, os.waitstatus_to_exitcode(status))
            conn.close()


if __name__ == "__main__":  # started by the site daemon, with SOCKET_ENV and the guard's settings in its environment
    serve(os.environ[SOCKET_ENV])
