"""``fedseg-sim``: simulated hospitals on one machine (with no arguments: the built-in demo)."""

from __future__ import annotations

import sys

from common.cli import make_main

COMMANDS = {
    "run": ("simulations.run_cmd", "Run the local multi-site simulation (the default)."),
    "compare": ("simulations.compare", "Compare local, pooled and federated strategies under scanner shift."),
}

main = make_main(
    "fedseg-sim",
    "Run a federation of simulated hospitals on one machine (Flower simulation engine, Ray). "
    "With no arguments: 3 synthetic sites with strong scanner shift, 3 rounds.",
    COMMANDS,
    default="run",
)

if __name__ == "__main__":
    sys.exit(main())
