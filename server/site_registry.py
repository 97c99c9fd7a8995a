"""Which Flower node is which site, as registered by the launcher, for naming failed sites.

A site that fails before it can reply (a refused app bundle, a crash, a lost
connection) sends no identity record, so the strategy would only know its
node id. The launcher registered every node under its site name with the
SuperLink, and writes that mapping here for the ServerApp to read.
"""

from __future__ import annotations

import json
from pathlib import Path

NODES_FILE = "nodes.json"


def write_nodes(run: Path, names: dict[int, str]) -> None:
    (Path(run) / NODES_FILE).write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1))


def read_nodes(run: Path) -> dict[int, str]:
    """Node id -> site name; empty in the simulation, where nothing is registered."""
    path = Path(run) / NODES_FILE
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
