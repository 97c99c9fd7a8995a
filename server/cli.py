"""``fedseg-server``: what the coordinating centre runs."""

from __future__ import annotations

import sys

from common.cli import make_main

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with add_arguments/run, one-line help)
    "start": ("server.launcher", "Run the centre: SuperLink, Fleet gateway and the training run."),
    "certs": ("server.certs_cmd", "Create the federation CA and server certificate; allow-list site keys."),
    "report": ("server.report_cmd", "Plots and a one-page summary of a run (also while it runs)."),
    "site-package": ("server.site_package", "Package a run for one site: what its export, predict and report read."),
}

main = make_main("fedseg-server", "The coordinating centre of a fedseg federation.", COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
