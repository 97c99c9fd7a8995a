"""One shape for fedseg's three commands: ``<command> <subcommand> --config X.yaml --set k=v``.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``;
modules import their heavy dependencies inside ``run`` so ``--help`` stays fast.
Errors fedseg anticipates (bad config, bad data, refused certificates) end with
one clear line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import CentreFile, ConfigError, FedsegConfig, Section, SiteFile, load_config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file (see deploy/ for commented examples).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override one option, e.g. --set train.lr=0.0005 (repeatable; beats the YAML).",
    )


@dataclass(frozen=True)
class Shortcut:
    """A flag that stands for one ``--set`` override: ``--rounds 3`` is ``--set federation.rounds=3``."""

    flag: str
    key: str
    value: str = "N"
    """What the value is, as the help writes it after ``key=``."""
    note: str = ""
    """Said after the override in the help, e.g. what the same value again means."""
    type: Callable[[str], Any] = int

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def override(self, args: argparse.Namespace) -> list[str]:
        """The ``--set`` override this flag gave, or none when it was not given."""
        value = getattr(args, self.dest)
        return [] if value is None else [f"{self.key}={value}"]


ROUNDS = Shortcut("--rounds", "federation.rounds")
RUN_NAME = Shortcut("--run-name", "federation.run_name", "NAME", " (same name: resume)", str)


def add_shortcuts(parser: argparse.ArgumentParser, *shortcuts: Shortcut) -> None:
    """Add the flags, in this order; ``config_from_args`` applies the ones given after ``--set``."""
    for s in shortcuts:
        parser.add_argument(s.flag, type=s.type, help=f"Shortcut for --set {s.key}={s.value}{s.note}.")
    parser.set_defaults(shortcuts=shortcuts)


def add_allow_config_change(parser: argparse.ArgumentParser) -> None:
    """The one flag that lets a resumed run (same run name) take a configuration other than its own."""
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="Resume a run with a configuration that differs from the one it started with (the "
        "change is written to its metrics log); without it such a restart is refused.",
    )


def add_weights_argument(parser: argparse.ArgumentParser, default_note: str) -> None:
    """``--weights``: the round of a run a site command uses; ``default_note`` ends the default's description
    (the rule itself is client/site_model.py's DEFAULT_RULE)."""
    parser.add_argument(
        "--weights",
        help="Round of the run: best, last or round-N (default: "
        f"the centre's best round, else its last{default_note}).",
    )


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> FedsegConfig:
    """The config file, read as the command's kind of file, plus ``--set`` overrides, plus the shortcut flags
    given (``add_shortcuts``), plus subcommand-specific overrides."""
    shortcuts = [o for s in getattr(args, "shortcuts", ()) for o in s.override(args)]
    return load_config(
        args.config, [*args.overrides, *shortcuts, *(extra or [])], getattr(args, "config_schema", FedsegConfig)
    )


def site_state_dir(cfg: FedsegConfig) -> Path:
    """The site's state folder (site.state_dir), which every site command that reads or keeps its history needs."""
    if not cfg.site.state_dir:
        raise UserError("site.state_dir is not set: pass the site's site.yaml with --config.")
    return Path(cfg.site.state_dir)


CONFIG_FILES: dict[str, type[Section]] = {
    "fedseg-client": SiteFile,
    "fedseg-server": CentreFile,
    "fedseg-sim": CentreFile,
}
"""The kind of file each command's ``--config`` names: a hospital's site.yaml, or the centre's federation.yaml
(a simulation's YAML is the centre's, with its ``simulation`` section)."""


class Main(Protocol):
    """A console script's entry point: ``main()`` reads ``sys.argv``, ``main(argv)`` the given arguments."""

    def __call__(self, argv: list[str] | None = None) -> int: ...


def make_main(prog: str, description: str, commands: dict[str, tuple[str, str]], default: str | None = None) -> Main:
    """Build a ``main(argv)`` dispatching to ``commands``: name -> (module, one-line help)."""

    def main(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        if default and (not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
            argv.insert(0, default)
        parser = argparse.ArgumentParser(prog=prog, description=description)
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        modules = {}
        for name, (module_name, help_text) in commands.items():
            module = importlib.import_module(module_name)
            sp = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
            add_config_arguments(sp)
            sp.set_defaults(config_schema=CONFIG_FILES[prog])
            module.add_arguments(sp)
            modules[name] = module
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return int(modules[args.command].run(args) or 0)
        except (ConfigError, UserError) as err:
            print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prog} {args.command}: interrupted; everything it started has been stopped.", file=sys.stderr)
            return EXIT_INTERRUPTED

    return main
