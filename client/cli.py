"""``fedseg-client``: what each hospital runs."""

from __future__ import annotations

import sys

from common.cli import make_main

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with add_arguments/run, one-line help)
}

main = make_main("fedseg-client", "A hospital's site in a fedseg federation.", COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
