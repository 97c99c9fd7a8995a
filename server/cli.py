"""``fedseg-server``: what the coordinating centre runs."""

from __future__ import annotations

import sys

from common.cli import make_main

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with add_arguments/run, one-line help)
}

main = make_main("fedseg-server", "The coordinating centre of a fedseg federation.", COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
