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

- Flower then imports the ClientApp from a folder whose name it builds from
  the run's ``fab_id``/``fab_version``, which the centre chooses, not from
  the bundle it checked: a version holding ``/../`` would load code from any
  folder named ``*.<hash8>`` (for example one a local user planted under a
  world-writable temporary folder). So the guard also stands in for Flower's
  project-folder lookup (:class:`ApprovedApp`): the run must name exactly
  the approved bundle's own identity (its pyproject's publisher, name and
  version, each a strict pattern, and the bytes' SHA-256), the folder must
  lie directly in ``$FLWR_HOME/apps`` (owner-only, no symbolic links), and
  it holds exactly the approved bytes: anything else found there is
  replaced from them before Flower imports a line of it.

- Flower starts a different executable for every other task type a run can
  declare (``flwr-agentapp`` for a bundle with an ``agentapp`` component,
  and so on: ``TASK_TYPE_TO_COMMAND``). Each of them would install and
  import the bundle with no check, so the same folder holds a launcher of
  that name for every one of them, which refuses the task and records the
  refusal: a fedseg site runs ClientApp tasks only.

It fails closed: no list, or a Flower whose ClientApp runner no longer has the
steps it wraps, means every bundle is refused; a Flower without the task
table, or whose ClientApp command is renamed, stops the daemon from starting.
How the steps are put in place is Flower's side (common/flower/clientapp_runner.py);
what they allow is decided here. Of fedseg, this module imports only that
door, from the same installation as itself, and forgets both before Flower
loads the bundle, so the bundle's code is its own copy and no unapproved code
can shadow the guard. Residual risks are spelled out in docs/deployment.md,
"Which code runs at a hospital, and what is left to trust".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from common.flower import FLOWER_VERSION
from common.flower.clientapp_runner import (
    APPS_DIR,
    CLIENTAPP_COMMAND,
    HASH_PREFIX_LEN,
    flower_steps,
    missing_steps,
    replace_steps,
    run_clientapp,
    task_commands,
)

APPROVED_ENV = "FEDSEG_APPROVED_BUNDLES"
"""Comma-separated SHA-256 digests of the approved bundles."""
DECISIONS_ENV = "FEDSEG_BUNDLE_LOG"
"""JSON Lines file where every accept/refuse decision is recorded at the site."""
APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
"""A publisher or project name: no dot, slash, backslash or control character can reach a folder name."""
APP_VERSION = re.compile(r"[0-9][0-9A-Za-z+_-]*(\.[0-9A-Za-z+_-]+){0,7}")
"""A version (PEP 440 and semantic versions fit): dot-separated words, never an empty part, ``..`` or ``/``."""
BUNDLE_META = ".info/"
"""Flower's manifest inside a bundle, which its installer removes; everything else is installed."""
CACHE_DIR = "__pycache__"
OWN_PACKAGES = ("client", "common")
"""fedseg packages this process loaded before the bundle; forgotten, so the bundle's own copies load."""
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


def bundle_identity(content: bytes) -> tuple[str, str]:
    """``(fab_id, version)`` from the bundle's own pyproject.toml, each checked against a strict pattern.

    This is the identity Flower's installer names the folder after; checking
    it here means no part of the folder name can step out of ``apps/``.
    """
    import tomllib

    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            config = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        publisher, name = config["tool"]["flwr"]["app"]["publisher"], config["project"]["name"]
        version = config["project"]["version"]
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile) as err:
        raise BundleNotApproved(f"the approved bundle has no readable publisher, name and version ({err})") from None
    for what, value, pattern in (
        ("publisher", publisher, APP_NAME),
        ("name", name, APP_NAME),
        ("version", version, APP_VERSION),
    ):
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise BundleNotApproved(
                f"the approved bundle's {what} {value!r:.80} is not of the form "
                f"{pattern.pattern}; rebuild the release with a plain {what}"
            )
    return f"{publisher}/{name}", version


def _bundle_files(content: bytes) -> dict[str, bytes]:
    """Relative path -> bytes of every file Flower's installer puts into the app folder."""
    with zipfile.ZipFile(io.BytesIO(content)) as bundle:
        return {
            item.filename: bundle.read(item)
            for item in bundle.infolist()
            if not item.is_dir() and not item.filename.startswith(BUNDLE_META)
        }


def _holds_exactly(folder: Path, expected: dict[str, bytes], trust_caches: bool = True) -> bool:
    """Whether ``folder`` is a real folder holding exactly ``expected``, no links; bytecode caches are set
    aside if ``trust_caches`` (Python wrote them in this owner-only home; see ApprovedApp), else any is a
    difference."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    found = 0
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if any((here / d).is_symlink() for d in dirs) or (not trust_caches and CACHE_DIR in dirs):
            return False
        dirs[:] = [d for d in dirs if d != CACHE_DIR]
        for name in files:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or rel not in expected or path.read_bytes() != expected[rel]:
                return False
            found += 1
    return found == len(expected)


def _private_home(home: Path) -> tuple[Path, bool]:
    """``$FLWR_HOME`` (resolved), created owner-only, and whether others could write into it until now.

    A link or a folder of another user is refused. One of ours that group or
    others may write (a umask of 002 makes it so) loses those bits; the caller
    then trusts nothing already in it.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    was_open = False
    for folder in (home, home / APPS_DIR):
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
            raise BundleNotApproved(
                f"{folder} is a link or another user's folder, so code there could change "
                "after the check; point FLWR_HOME at a folder of the site's own (the site "
                "daemon keeps it in its private state folder)"
            )
        if info.st_mode & 0o022:
            os.chmod(folder, stat.S_IMODE(info.st_mode) & ~0o022)
            was_open = True
    return home.resolve(), was_open


class ApprovedApp:
    """The one bundle a ClientApp process may run: approved bytes in, the folder they were installed to out.

    Flower 1.42 installs the received bytes (``install_from_fab``) and then
    loads the ClientApp from ``get_project_dir(run.fab_id, run.fab_version,
    fab.hash_str)``, whose arguments come from the centre. :meth:`install`
    and :meth:`project_dir` stand in for those two steps, so the folder
    Flower imports from is the one made from the approved bytes, whatever
    the run says. Bytecode caches (``__pycache__``) in that folder are
    trusted while ``$FLWR_HOME`` is owner-only (checked, and made so): whoever
    can write there can also rewrite the guard's own launcher. Found writable
    by others, the folder is installed afresh, without caches.
    """

    def __init__(
        self,
        approved: frozenset[str],
        log_path: str | None,
        install: Callable[..., Any],
        flower_project_dir: Callable[[str, str, str], Path],
        home: Callable[[], Path],
    ) -> None:
        self.approved = approved
        self.log_path = log_path
        self._install = install
        self._flower_project_dir = flower_project_dir
        self._home = home
        self.installed: tuple[str, str, str, Path] | None = None
        """``(fab_id, version, sha256, folder)`` of the bundle this process approved and installed."""

    def install(self, fab_file: Any, *args: Any, **kwargs: Any) -> Path:
        """Check the bytes, then make the app folder hold exactly them (Flower's installer unpacks them)."""
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = check_bundle(content, self.approved, self.log_path)
        fab_id, version = bundle_identity(content)
        home, was_open = _private_home(self._home())
        folder = Path(self._flower_project_dir(fab_id, version, digest))
        if (
            folder.parent.resolve() != home / APPS_DIR
            or folder.name != f"{fab_id.replace('/', '.')}.{version}.{digest[:HASH_PREFIX_LEN]}"
        ):
            raise BundleNotApproved(
                f"Flower would install the approved bundle to {folder}, not directly in "
                f"{home / APPS_DIR}; pin flwr {FLOWER_VERSION} or update "
                "common/flower/clientapp_runner.py"
            )
        self._materialise(content, folder, trust_caches=not was_open)
        self.installed = (fab_id, version, digest, folder)
        return folder

    def _materialise(self, content: bytes, folder: Path, trust_caches: bool = True) -> None:
        """Leave ``folder`` holding exactly the bundle's files: kept if it does, else replaced from the bytes."""
        expected = _bundle_files(content)
        if _holds_exactly(folder, expected, trust_caches):
            return
        staging = Path(tempfile.mkdtemp(prefix=".fedseg-install-", dir=folder.parent.parent))
        try:
            fresh = Path(self._install(content, install_dir=staging, skip_prompt=True))
            if not _holds_exactly(fresh, expected):
                raise BundleNotApproved(f"Flower's installer did not unpack the approved bundle as it is ({fresh})")
            if folder.is_symlink() or folder.exists():
                _record(
                    self.log_path,
                    decision="replaced",
                    folder=str(folder),
                    reason="the app folder did not hold exactly the approved bundle",
                )
                try:
                    os.rename(folder, staging / "replaced")  # a link is moved, never followed
                except FileNotFoundError:  # another ClientApp process moved it away first
                    pass
            try:
                os.rename(fresh, folder)
            except OSError:  # another ClientApp process put its own fresh copy there meanwhile
                if not _holds_exactly(folder, expected):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def project_dir(self, fab_id: str, fab_version: str, fab_hash: str) -> Path:
        """Flower's project-folder lookup, answered only for the bundle this process approved and installed."""
        if self.installed is None:
            raise BundleNotApproved(
                "Flower asked where to load an app from before any approved bundle was "
                "installed in this process; refusing to load anything"
            )
        approved_id, approved_version, digest, folder = self.installed
        if (fab_id, fab_version, fab_hash) != (approved_id, approved_version, digest):
            _record(
                self.log_path,
                decision="refused",
                sha256=digest,
                reason=f"the run names app {fab_id!r:.120} version {fab_version!r:.120}, "
                f"hash {fab_hash!r:.80}, not the approved bundle it sent",
            )
            raise BundleNotApproved(
                f"the run names app {fab_id!r:.120} version {fab_version!r:.120} (hash {fab_hash!r:.80}), but the "
                f"approved bundle it sent is {approved_id} {approved_version} (sha256:{digest[:16]}); "
                "only the approved bundle's own folder is ever loaded: ask the centre to start the run from "
                "that release unchanged"
            )
        return folder


def guard_clientapp(approved: frozenset[str], log_path: str | None) -> ApprovedApp:
    """Put an :class:`ApprovedApp` in place of Flower's install and folder lookup in this process."""
    app = ApprovedApp(approved, log_path, *flower_steps())
    replace_steps(app.install, app.project_dir)
    return app


def _forget_own_modules() -> None:
    """Let the approved bundle's own copies of ``client`` and ``common`` load, as Flower intends."""
    for name in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
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
    approved = approved_from_env(os.environ)
    missing = missing_steps()
    if missing:
        print(
            f"fedseg bundle guard: this Flower has no {', '.join(missing)} to guard; refusing to run any bundle. "
            f"Pin flwr {FLOWER_VERSION} or update common/flower/clientapp_runner.py.",
            file=sys.stderr,
        )
        return 1
    guard_clientapp(approved, os.environ.get(DECISIONS_ENV))
    _forget_own_modules()
    run_clientapp()
    return 0


def refuse_task(command: str) -> int:
    """Entry point of every launcher but the ClientApp's: record the refusal and start nothing."""
    _record(
        os.environ.get(DECISIONS_ENV),
        decision="refused",
        task=command,
        reason="a fedseg site runs ClientApp tasks only",
    )
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
    for command in sorted(task_commands() - {CLIENTAPP_COMMAND}):
        _write_script(
            bin_dir / command, f"from client.bundle_guard import refuse_task\nsys.exit(refuse_task({command!r}))\n"
        )
    return _write_script(bin_dir / CLIENTAPP_COMMAND, f"from {entry} import main\nsys.exit(main())\n")


def guard_env(bin_dir: Path, approved: Iterable[str], decisions: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the launcher first on PATH and the approved list handed over."""
    out = dict(env)
    out["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    out[APPROVED_ENV] = ",".join(sorted(parse_approved(approved)))
    out[DECISIONS_ENV] = str(decisions)
    return out
