"""Which Flower node is which site, as registered by the launcher, for naming failed sites.

A site that fails before it can reply (a refused app bundle, a crash, a lost
connection) sends no identity record, so the strategy would only know its
node id. The launcher registered every node under its site name with the
SuperLink, and writes that mapping here for the ServerApp to read. The same
mapping is the only source of a site's name: a reply's identity record is
checked against it, never believed (site B must not be able to replace site
A's fingerprint or metrics by naming itself A).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.runs import NODES_FILE


def write_nodes(run: Path, names: dict[int, str]) -> None:
    (Path(run) / NODES_FILE).write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1))


def read_nodes(run: Path) -> dict[int, str]:
    """Node id -> site name; empty in the simulation, where nothing is registered."""
    path = Path(run) / NODES_FILE
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def site_name(nodes: dict[int, str], node: int, claimed: str | None) -> str:
    """The name of the site behind ``node``: its registered name, never the one a reply claims.

    A node the launcher did not register (the simulation registers none) is
    bound to the first name it claims, unless another node holds that name
    already; from then on that binding is what counts, so one site can never
    speak for another.
    """
    if node not in nodes and claimed and claimed not in nodes.values():
        nodes[node] = claimed
    return nodes.get(node, f"node-{node}")


def claim_problem(nodes: dict[int, str], node: int, claimed: str | None) -> str | None:
    """Why a reply's claimed name cannot be accepted from ``node``, or None when it matches."""
    name = site_name(nodes, node, claimed)
    if claimed is not None and claimed != name:
        return f"the reply claims to be site '{claimed}', but it came from the node of site '{name}'"
    return None
