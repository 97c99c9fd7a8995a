"""Flower's runtime stays behind one door (common/flower/), and that door still fits the installed Flower.

Two kinds of check. The first fails loudly when Flower changes under a patch:
the installed Flower is the release the door was written for, and every
target a patch reaches (a module's ``time``, a function's keyword defaults, a
step's signature, a constant the guard copies) is still there in the shape
the patch expects. The second keeps the door the only one: an AST scan of
common/, server/, client/ and simulations/ finds no other import of a private
Flower module, no dynamic import of one by name, and no assignment into a
Flower object.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import time
from pathlib import Path

import flwr
import pytest

import common.flower
from common.flower import FLOWER_VERSION, clientapp_runner, grid, object_pulls, supernode

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("common", "server", "client", "simulations")
DOOR = ROOT / "common" / "flower"
PUBLIC = frozenset({"flwr", "flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.common"})
"""Flower's public modules: the Message API, ServerApp with its strategies, ClientApp, and top-level flwr.common."""
MODULE_NAME = re.compile(r"flwr(\.\w+)+")


# --- the door fits the installed Flower ---------------------------------------------------------------------


def test_the_installed_flower_is_the_release_the_door_was_written_for():
    installed = ".".join(flwr.__version__.split(".")[:2])
    assert installed == FLOWER_VERSION, (
        f"flwr {flwr.__version__} is installed, but common/flower/ was written for Flower {FLOWER_VERSION}: check "
        "every patch there against the new release (this file says what each expects), then update FLOWER_VERSION"
    )
    pin = (ROOT / "pyproject.toml").read_text()
    assert f'"flwr[simulation]=={FLOWER_VERSION}.*"' in pin, "pyproject.toml pins another Flower than FLOWER_VERSION"


def test_every_module_of_the_door_imports():
    for module in pkgutil.iter_modules(common.flower.__path__):
        importlib.import_module(f"common.flower.{module.name}")


def _keyword_defaults(function: object) -> dict:
    return getattr(function, "__kwdefaults__", None) or {}


def test_the_object_pull_patch_finds_both_pull_functions_with_the_defaults_it_sets():
    pulls = importlib.import_module(object_pulls.PULL_MODULE)
    for name in object_pulls.PULL_FUNCTIONS:
        function = getattr(pulls, name, None)
        assert callable(function), f"{object_pulls.PULL_MODULE}.{name} is gone"
        assert object_pulls.PULL_DEFAULTS <= _keyword_defaults(function).keys(), (
            f"{object_pulls.PULL_MODULE}.{name} no longer has keyword defaults {sorted(object_pulls.PULL_DEFAULTS)}"
        )


def test_the_supernode_patches_find_the_loops_time_and_its_pull_step():
    loop = importlib.import_module(supernode.LOOP_MODULE)
    assert loop.time is time, f"{supernode.LOOP_MODULE} no longer sleeps through a module-level time"
    pull = getattr(loop, supernode.PULL_STEP, None)
    assert callable(pull), f"{supernode.LOOP_MODULE}.{supernode.PULL_STEP} is gone"
    assert "receive" in inspect.signature(pull).parameters, f"{supernode.PULL_STEP} no longer takes receive"
    calls = [
        node
        for node in ast.walk(ast.parse(inspect.getsource(loop)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == supernode.PULL_STEP
    ]
    assert calls and all("receive" in {k.arg for k in call.keywords} for call in calls), (
        f"the SuperNode's loop no longer calls {supernode.PULL_STEP} with receive= (the noted pull takes it so)"
    )
    assert callable(getattr(importlib.import_module(supernode.SUPERNODE_CLI), "flower_supernode", None))


def test_the_noted_pull_reports_the_id_of_the_message_flower_received():
    """The wrapper's contract with Flower's step: ``receive()`` returns ``(message, tree)`` or None."""
    from flwr.app import RecordDict

    from tests.helpers.envelopes import incoming

    noted, message = [], incoming(RecordDict(), "train", node_id=1)
    loop = type(time)("stand_in")
    setattr(loop, supernode.PULL_STEP, lambda *args, receive, **kwargs: receive())
    assert supernode.note_pulls(loop, noted.append)
    assert getattr(loop, supernode.PULL_STEP)(receive=lambda: (message, None))[0] is message
    assert getattr(loop, supernode.PULL_STEP)(receive=lambda: None) is None
    assert noted == [message.metadata.message_id]


def test_the_clientapp_runner_steps_the_bundle_guard_replaces_are_there_with_their_signatures():
    assert clientapp_runner.missing_steps() == []
    runner = importlib.import_module(clientapp_runner.RUNNER_MODULE)
    loader = importlib.import_module(clientapp_runner.LOADER_MODULE)
    install = inspect.signature(getattr(runner, clientapp_runner.INSTALL_STEP))
    assert list(install.parameters)[:3] == ["fab_file", "install_dir", "skip_prompt"]
    for module in (runner, loader):
        lookup = inspect.signature(getattr(module, clientapp_runner.LOOKUP_STEP))
        assert list(lookup.parameters) == ["fab_id", "fab_version", "fab_hash"]
    assert callable(getattr(importlib.import_module(clientapp_runner.CLIENTAPP_CLI), "flwr_clientapp", None))
    assert clientapp_runner.CLIENTAPP_COMMAND in clientapp_runner.task_commands()


def test_the_constants_the_bundle_guard_copies_are_flowers():
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION

    assert (clientapp_runner.APPS_DIR, clientapp_runner.HASH_PREFIX_LEN) == (APP_DIR, FAB_HASH_TRUNCATION)


def test_make_message_still_builds_a_reply_from_metadata_and_an_error():
    from common.flower.messages import make_message

    assert list(inspect.signature(make_message).parameters) == ["metadata", "content", "error"]


def test_the_control_client_has_every_call_the_launcher_makes():
    from common.flower.control import ControlHttpClient

    calls = (
        "from_server_address",
        "close",
        "ListNodes",
        "RegisterNode",
        "UnregisterNode",
        "StartRun",
        "ListRuns",
        "StopRun",
    )
    assert [c for c in calls if not hasattr(ControlHttpClient, c)] == []


def test_the_grid_decorators_override_every_abstract_method_of_flowers_grid():
    from flwr.serverapp import Grid

    assert Grid.__abstractmethods__ <= set(vars(grid.DelegatingGrid)), (
        f"Flower's Grid has abstract methods {sorted(Grid.__abstractmethods__ - set(vars(grid.DelegatingGrid)))} "
        "that common/flower/grid.py's DelegatingGrid does not pass on"
    )
    timeout = inspect.signature(Grid.send_and_receive).parameters["timeout"]
    assert timeout.kind is inspect.Parameter.KEYWORD_ONLY


# --- the door is the only one -------------------------------------------------------------------------------


def _private(module: str) -> bool:
    return module.split(".")[0] == "flwr" and module not in PUBLIC


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def door_violations(source: str) -> list[str]:
    """What in ``source`` reaches Flower's internals or patches Flower, one line per finding."""
    tree = ast.parse(source)
    found, flower_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: import {alias.name}")
                if alias.name.split(".")[0] == "flwr":
                    flower_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _private(node.module) or (node.module == "flwr" and any(_private(f"flwr.{a.name}") for a in node.names)):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            if node.module.split(".")[0] == "flwr":
                flower_names.update(a.asname or a.name for a in node.names)
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AugAssign, ast.AnnAssign))
            else []
        )
        for target in targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)) and _root_name(target) in flower_names:
                found.append(f"line {target.lineno}: assigns into Flower's {_root_name(target)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
            and _root_name(node.args[0]) in flower_names
        ):
            found.append(f"line {node.lineno}: {node.func.id} on Flower's {_root_name(node.args[0])}")
        if isinstance(node, ast.Attribute) and node.attr in ("__kwdefaults__", "__defaults__", "__code__"):
            found.append(f"line {node.lineno}: reaches {node.attr}")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_NAME.fullmatch(node.value)
            and _private(node.value)
        ):
            found.append(f"line {node.lineno}: names private module {node.value!r}")
    return found


def _app_modules() -> list[Path]:
    return [
        path for package in APP_PACKAGES for path in sorted((ROOT / package).rglob("*.py")) if DOOR not in path.parents
    ]


def test_no_app_module_imports_a_private_flower_module_or_patches_flower():
    violations = {
        str(path.relative_to(ROOT)): found for path in _app_modules() if (found := door_violations(path.read_text()))
    }
    assert not violations, (
        "Flower's internals are reached outside common/flower/; move the import or patch there "
        f"(with the shape it expects checked in this file): {violations}"
    )


@pytest.mark.parametrize(
    "source",
    [
        "from flwr.common.constant import SUPERLINK_NODE_ID",
        "import flwr.supernode.start_client_internal as loop",
        "from flwr import supercore",
        "from flwr.app.message.message import make_message",
        "import importlib\nimportlib.import_module('flwr.supercore.inflatable.inflatable_utils')",
        "from flwr.app import Message\nMessage.has_error = lambda self: False",
        "from flwr.serverapp import strategy\nsetattr(strategy, 'FedAvg', object)",
        "import flwr\nflwr.serverapp.Grid.send_and_receive = None",
        "def f(g):\n    g.__kwdefaults__['backoff_cap'] = 0",
    ],
)
def test_the_scan_finds_a_private_import_or_a_patch(source):
    assert door_violations(source)


def test_the_scan_lets_public_flower_and_app_code_through():
    source = (
        "import flwr\nfrom flwr.app import ArrayRecord, Message\nfrom flwr.serverapp import Grid\n"
        "from flwr.serverapp.strategy import FedProx\nfrom flwr.clientapp import ClientApp\n"
        "from flwr.common import Context\nfrom common.flower.constants import SUPERLINK_NODE_ID\n"
        "def f(msg: Message) -> None:\n    msg.content = None\nVERSION = flwr.__version__\n"
    )
    assert door_violations(source) == []
