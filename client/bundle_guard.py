"""The site runs only app bundles it has approved, checked before any bundle code runs.

A SuperNode executes whatever app bundle (FAB) the SuperLink sends, and
Flower 1.42's own check (``--trusted-entities``) only accepts bundles signed
through Flower's hub, which an air-gapped federation cannot reach. So the
site's daemon puts this guard in front of Flower's ClientApp process:

- ``fedseg-client start`` writes a ``flwr-clientapp`` launcher into a private
  folder placed first on the SuperNode's PATH (Flower starts its ClientApp
  processes by that name) and hands over the approved SHA-256 list in
  ``FEDSEG_APPROVED_BUNDLES``.
- The launcher wraps Flower's FAB installation step: the SHA-256 of the
  received bundle bytes must be on the list, otherwise the task fails with
  :class:`BundleNotApproved` before the bundle is unpacked or imported.
  Flower then replies to the server with an error, so the refusal shows up
  in the run's metrics log as a failure of that site.

- Flower starts a different executable for every other task type a run can
  declare (``flwr-agentapp`` for a bundle with an ``agentapp`` component,
  and so on: ``TASK_TYPE_TO_COMMAND``). Each of them would install and
  import the bundle with no check, so the same folder holds a launcher of
  that name for every one of them, which refuses the task and records the
  refusal: a fedseg site runs ClientApp tasks only.

It fails closed: no list, or a Flower whose ClientApp runner no longer has the
step it wraps, means every bundle is refused; a Flower without the task
table, or whose ClientApp command is renamed, stops the daemon from starting. This module imports nothing
from fedseg (the bundle brings its own copy), so no unapproved code can
shadow it. Residual risks are spelled out in README, "Deploy across hospitals".
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

APPROVED_ENV = "FEDSEG_APPROVED_BUNDLES"
"""Comma-separated SHA-256 digests of the approved bundles."""
DECISIONS_ENV = "FEDSEG_BUNDLE_LOG"
"""JSON Lines file where every accept/refuse decision is recorded at the site."""
LAUNCHER = "flwr-clientapp"
"""The executable name Flower's SuperExec starts for every ClientApp task."""
WRAPPED_MODULE = "flwr.supernode.runtime.run_clientapp"
WRAPPED_STEP = "install_from_fab"
OWN_PACKAGE = "client"
CHECKED_AT_ENV = "FEDSEG_BUNDLE_CHECKED_AT"
"""Timeline only (client/timeline.py): the Unix time this process accepted its bundle."""
SHA256_HEX_LEN = 64


class BundleNotApproved(RuntimeError):
    """The received app bundle is not on this site's approved list."""


def parse_approved(values: Iterable[str]) -> frozenset[str]:
    """Normalised digests; anything that is not a SHA-256 hex digest is an error."""
    digests = set()
    for value in values:
        digest = value.strip().lower()
        if len(digest) != SHA256_HEX_LEN or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"'{value}' is not a SHA-256 hex digest (64 hex characters).")
        digests.add(digest)
    return frozenset(digests)


def _record(log_path: str | None, **fields: Any) -> None:
    if not log_path:
        return
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), **fields}) + "\n")


def check_bundle(content: bytes, approved: frozenset[str], log_path: str | None = None) -> str:
    """The bundle's SHA-256 if approved; raises :class:`BundleNotApproved` otherwise."""
    digest = hashlib.sha256(content).hexdigest()
    if digest not in approved:
        _record(log_path, decision="refused", sha256=digest, bytes=len(content))
        raise BundleNotApproved(
            f"this site has not approved app bundle sha256:{digest[:16]}; "
            "its operator must add the digest to site.approved_bundles after reviewing the release"
        )
    _record(log_path, decision="accepted", sha256=digest, bytes=len(content))
    os.environ[CHECKED_AT_ENV] = repr(time.time())  # timeline only: read back by the approved bundle's ClientApp
    return digest


def guard_install(install: Callable[..., Any], approved: frozenset[str], log_path: str | None) -> Callable[..., Any]:
    """Flower's FAB installer, preceded by the approval check."""

    def guarded(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        check_bundle(content, approved, log_path)
        return install(fab_file, *args, **kwargs)

    return guarded


def _forget_own_modules() -> None:
    """Let the approved bundle's own copy of ``client`` load, as Flower intends."""
    for name in [m for m in sys.modules if m == OWN_PACKAGE or m.startswith(OWN_PACKAGE + ".")]:
        del sys.modules[name]


def approved_from_env(env: Mapping[str, str]) -> frozenset[str]:
    """The approved digests handed over by the daemon; missing or malformed means none (fail closed)."""
    try:
        return parse_approved(filter(None, env.get(APPROVED_ENV, "").split(",")))
    except ValueError as err:
        print(f"fedseg bundle guard: {APPROVED_ENV}: {err} Refusing every bundle.", file=sys.stderr)
        return frozenset()


def main() -> int:
    """Entry point of the ``flwr-clientapp`` launcher: guard, then Flower's own ClientApp runner."""
    import importlib

    approved = approved_from_env(os.environ)
    runner = importlib.import_module(WRAPPED_MODULE)
    if not callable(getattr(runner, WRAPPED_STEP, None)):
        print(f"fedseg bundle guard: this Flower has no {WRAPPED_MODULE}.{WRAPPED_STEP} to guard; refusing to run "
              "any bundle. Pin flwr 1.42 or update client/bundle_guard.py.", file=sys.stderr)
        return 1
    setattr(runner, WRAPPED_STEP, guard_install(getattr(runner, WRAPPED_STEP), approved,
                                                os.environ.get(DECISIONS_ENV)))
    _forget_own_modules()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()
    return 0


def task_commands() -> frozenset[str]:
    """Every executable Flower's SuperExec may start for a task (flwr.supercore.constant.TASK_TYPE_TO_COMMAND)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    commands = frozenset(TASK_TYPE_TO_COMMAND.values())
    if LAUNCHER not in commands:
        raise RuntimeError(f"this Flower starts ClientApps by another name than {LAUNCHER}; the bundle guard "
                           "cannot stand in front of it. Pin flwr 1.42 or update client/bundle_guard.py.")
    return commands


def refuse_task(command: str) -> int:
    """Entry point of every launcher but the ClientApp's: record the refusal and start nothing."""
    _record(os.environ.get(DECISIONS_ENV), decision="refused", task=command,
            reason="a fedseg site runs ClientApp tasks only")
    print(f"fedseg bundle guard: refused a {command} task; this site runs ClientApp tasks only.", file=sys.stderr)
    return 1


def _write_script(path: Path, body: str) -> Path:
    path.write_text(
        f"#!{sys.executable}\n"
        "# Written by `fedseg-client start` (client/bundle_guard.py): every task Flower starts here\n"
        "# passes this guard before any bundle code is installed or imported.\n"
        f"import sys\n{body}"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return path


def write_launcher(bin_dir: Path, entry: str = __name__) -> Path:
    """Write the guarded ``flwr-clientapp`` launcher and a refusing one for every other task command.

    ``entry`` names the module whose ``main`` the ClientApp launcher runs: this one, or
    client.warm_start, whose launcher runs this module's ``main`` in a forked warm process.
    """
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in sorted(task_commands() - {LAUNCHER}):
        _write_script(bin_dir / command,
                      f"from client.bundle_guard import refuse_task\nsys.exit(refuse_task({command!r}))\n")
    return _write_script(bin_dir / LAUNCHER, f"from {entry} import main\nsys.exit(main())\n")


def guard_env(bin_dir: Path, approved: Iterable[str], decisions: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the launcher first on PATH and the approved list handed over."""
    out = dict(env)
    out["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    out[APPROVED_ENV] = ",".join(sorted(parse_approved(approved)))
    out[DECISIONS_ENV] = str(decisions)
    return out
