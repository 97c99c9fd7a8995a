"""The install is the same everywhere: constraints.txt pins exactly what this environment holds."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
PIN = re.compile(r"([A-Za-z0-9._-]+)==([^\s;#]+)")


def _pinned() -> dict[str, str]:
    lines = [line.strip() for line in CONSTRAINTS.read_text().splitlines()]
    return {canonicalize_name(m[1]): m[2] for line in lines if (m := PIN.fullmatch(line))}


def test_every_installed_package_is_pinned_at_its_installed_version():
    """A dependency added, removed or upgraded without updating constraints.txt fails here, not on a new machine."""
    pinned = _pinned()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("fedseg")
    unpinned = sorted(set(installed) - set(pinned))
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}"
    missing = sorted(set(pinned) - set(installed))
    assert not missing, f"in constraints.txt but not installed: {missing}"
    differ = {n: (pinned[n], v) for n, v in installed.items() if v.split("+")[0] != pinned[n]}
    assert not differ, f"constraints.txt version vs installed: {differ}"
