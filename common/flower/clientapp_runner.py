"""Flower 1.42's ClientApp runner with its install and app-folder steps replaced (the site's bundle guard's hooks).

Flower starts one ``flwr-clientapp`` process per ClientApp task. In it,
``flwr.supernode.runtime.run_clientapp`` installs the received bundle
(``install_from_fab``) and then finds the folder to import the ClientApp from
(``get_project_dir(fab_id, fab_version, fab_hash)``, also bound by name in
``flwr.clientapp.utils``, the ClientApp loader). :func:`replace_steps` puts a
caller's functions in place of those bindings; the site's bundle guard
(client/bundle_guard.py) decides what they allow. Flower starts another
executable for every other task type (:func:`task_commands`). Nothing here is
imported before it is called: the launcher loads Flower's runner only once its
approved list is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from . import FLOWER_VERSION

RUNNER_MODULE = "flwr.supernode.runtime.run_clientapp"
LOADER_MODULE = "flwr.clientapp.utils"
CLIENTAPP_CLI = "flwr.supernode.cli.flwr_clientapp"
RUNNER_MODULES = (RUNNER_MODULE, CLIENTAPP_CLI)
"""What a ClientApp process imports of Flower's internals (client/warm_start.py imports them ahead)."""
INSTALL_STEP = "install_from_fab"
"""``install_from_fab(fab_file, install_dir=None, skip_prompt=False) -> Path``, in the runner."""
LOOKUP_STEP = "get_project_dir"
"""``get_project_dir(fab_id, fab_version, fab_hash) -> Path``, in the runner and in the loader."""
CLIENTAPP_COMMAND = "flwr-clientapp"
"""The executable name Flower's SuperExec starts for every ClientApp task."""
APPS_DIR = "apps"
"""flwr.common.constant.APP_DIR: where Flower installs bundles under $FLWR_HOME."""
HASH_PREFIX_LEN = 8
"""flwr.common.constant.FAB_HASH_TRUNCATION: the digest characters in an installed folder's name."""

Install = Callable[..., Path]
Lookup = Callable[[str, str, str], Path]


def _steps() -> list[tuple[ModuleType, str]]:
    runner, loader = importlib.import_module(RUNNER_MODULE), importlib.import_module(LOADER_MODULE)
    return [(runner, INSTALL_STEP), (runner, LOOKUP_STEP), (loader, LOOKUP_STEP)]


def missing_steps() -> list[str]:
    """The steps :func:`replace_steps` replaces that this Flower does not have (empty on ``FLOWER_VERSION``)."""
    return [f"{module.__name__}.{name}" for module, name in _steps() if not callable(getattr(module, name, None))]


def flower_steps() -> tuple[Install, Lookup, Callable[[], Path]]:
    """Flower's own installer, app-folder lookup and ``$FLWR_HOME``, for the replacements to call."""
    from flwr.supercore.utils import get_flwr_home

    runner = importlib.import_module(RUNNER_MODULE)
    return getattr(runner, INSTALL_STEP), getattr(runner, LOOKUP_STEP), get_flwr_home


def replace_steps(install: Install, lookup: Lookup) -> None:
    """Make this process's ClientApp runner install with ``install`` and find app folders with ``lookup`` only."""
    for module, name in _steps():
        setattr(module, name, install if name == INSTALL_STEP else lookup)


def run_clientapp() -> None:
    """Flower's own ``flwr-clientapp`` entry point, with this process's arguments."""
    importlib.import_module(CLIENTAPP_CLI).flwr_clientapp()


def task_commands() -> frozenset[str]:
    """Every executable Flower's SuperExec may start for a task (``TASK_TYPE_TO_COMMAND``); raises if the
    ClientApp's is not among them (a guard in front of that name would then guard nothing)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    commands = frozenset(TASK_TYPE_TO_COMMAND.values())
    if CLIENTAPP_COMMAND not in commands:
        raise RuntimeError(
            f"this Flower starts ClientApps by another name than {CLIENTAPP_COMMAND}; the bundle "
            f"guard cannot stand in front of it. Pin flwr {FLOWER_VERSION} or update common/flower/."
        )
    return commands
