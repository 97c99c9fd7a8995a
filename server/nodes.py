"""Waiting for the federation's sites to connect before asking all of them something."""

from __future__ import annotations

import time

from flwr.serverapp import Grid

NODE_WAIT_POLL_S = 1.0


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """The connected node ids once ``expected`` are connected, or whoever is there after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(NODE_WAIT_POLL_S)
    return nodes
