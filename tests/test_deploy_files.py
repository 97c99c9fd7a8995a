"""deploy/ parses, and every command and option it uses exists (docker is not needed to check that)."""

from __future__ import annotations

import configparser
import contextlib
import functools
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from client.cli import main as client_main
from common.config import load_config
from server.cli import main as server_main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROOT = DEPLOY.parent


@functools.cache
def _help(command: str, sub: str) -> str:
    """The subcommand's --help text, from the same argparse parser the console script builds."""
    main = {"fedseg-server": server_main, "fedseg-client": client_main}[command]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([sub, "--help"])
    assert exited.value.code == 0
    return out.getvalue()


def _check_invocation(argv: list[str]) -> None:
    """``fedseg-x sub --opt ...``: the subcommand exists and every --option appears in its --help."""
    program = Path(argv[0]).name
    assert program in ("fedseg-server", "fedseg-client"), argv
    text = _help(program, argv[1])
    for option in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"(^|\s|\[){re.escape(option)}\b", text), f"{program} {argv[1]} has no {option}"


def test_example_configs_load_through_the_schema_with_every_option_present():
    from common.config import CentreFile, SiteFile, describe_options

    fed = load_config(DEPLOY / "federation.yaml", schema=CentreFile)
    assert fed.federation.sites and fed.server.fleet_port != fed.server.superlink_port
    site = load_config(DEPLOY / "site.yaml", schema=SiteFile)
    assert site.site.name and site.site.server_address and site.site.approved_bundles
    documented = {
        f"{section}.{key}"
        for section, body in yaml.safe_load((DEPLOY / "federation.yaml").read_text()).items()
        for key in body
    }
    documented |= {f"site.{key}" for key in yaml.safe_load((DEPLOY / "site.yaml").read_text())["site"]}
    expected = {k for k, _, _ in describe_options() if not k.startswith("simulation.")}
    assert not expected - documented, f"options missing from deploy examples: {sorted(expected - documented)}"


def test_compose_runs_one_server_and_three_sites_on_a_private_network():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    sites = [n for n in services if n != "server"]
    assert len(sites) == 3
    assert compose["networks"]["federation"]["internal"] is True
    for service in services.values():
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        entry = _entrypoint(dockerfile)
        _check_invocation([entry, *service["command"]])
        assert service["networks"] == ["federation"]
        assert not service.get("ports"), "nothing is published outside the private network"


def _entrypoint(dockerfile: Path) -> str:
    text = dockerfile.read_text()
    (entry,) = re.findall(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    argv = json.loads(entry) + json.loads(cmd)
    _check_invocation(argv)
    return argv[0]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.site"])
def test_dockerfiles_copy_existing_sources_and_run_existing_commands(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
    _entrypoint(DEPLOY / dockerfile)


@pytest.mark.parametrize("unit", ["fedseg-server.service", "fedseg-client.service"])
def test_systemd_units_parse_and_start_existing_commands(unit):
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / unit)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = parser["Service"]
    assert service["KillSignal"] == "SIGTERM" and service["Type"] == "simple"
    _check_invocation(shlex.split(service["ExecStart"]))


def test_the_checker_catches_an_option_that_does_not_exist():
    with pytest.raises(AssertionError, match="has no --no-such-option"):
        _check_invocation(["fedseg-client", "start", "--no-such-option", "x"])
