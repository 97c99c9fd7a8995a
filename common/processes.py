"""The processes we start: waiting until one serves, stopping on a signal, and stopping its whole tree.

Flower's SuperLink spawns the simulation or ServerApp process, which spawns
Ray's workers; some of these start sessions of their own, so signalling one
process group is not enough. The tree is read from /proc before signalling.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import httpx

TERM_GRACE_S = 20.0
KILL_GRACE_S = 5.0
HEALTH_POLL_S = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Shutdown(Exception):
    """SIGTERM or SIGINT arrived (inside ``stop_on_signals``): stop what was started and leave."""


def _raise_shutdown(signum: int, frame: object) -> None:
    raise Shutdown(signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``Shutdown`` inside the block, so ``finally`` clauses stop what it started;
    the previous handlers come back afterwards."""
    previous = {s: signal.signal(s, _raise_shutdown) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_healthy(
    proc: subprocess.Popen,
    url: str,
    *,
    what: str,
    log: Path,
    timeout_s: float,
    error: type[Exception],
    verify: bool | str = True,
    require_success: bool = False,
) -> None:
    """Return once ``url`` answers (with a 2xx status if ``require_success``); raise ``error``, naming ``log``,
    if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{what} exited with code {proc.returncode} while starting; see {log}")
        try:
            if httpx.get(url, verify=verify, timeout=1.0).is_success or not require_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL_S)
    raise error(f"{what} did not come up within {timeout_s:.0f} s; see {log}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """All living descendants of ``pid`` (children first found, then theirs)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [p for p in found if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it only waits to be reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tree(proc: subprocess.Popen | None) -> None:
    """SIGTERM ``proc`` and all its descendants, wait, then SIGKILL what is left."""
    if proc is None:
        return
    pids = [proc.pid, *descendants(proc.pid)]
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
        pids += [d for p in pids for d in descendants(p) if d not in pids]
        _signal_all(pids, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            proc.poll()
            time.sleep(0.2)
    proc.poll()


class Busy(RuntimeError):
    """Another process holds what this one needs (a state folder's lock, a port); the message names it."""


def hold_lock(path: Path, holder: str) -> TextIO:
    """Take an exclusive lock on ``path`` for as long as the returned file stays open, or raise Busy.

    The file holds the holder's pid and description, so the refusal can name
    the process that has it. The kernel drops the lock when that process ends,
    however it ends: no stale lock survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise Busy(f"{owner} holds {path.parent}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({holder})")
    handle.flush()
    return handle


def port_free(host: str, port: int) -> bool:
    """Whether a listening socket could be bound to ``host:port`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
