"""Print the SHA-256 of the app bundle built from a reviewed copy of fedseg, to approve it in site.yaml.

The site computes the digest itself, from the release it has reviewed (by
default the fedseg this command belongs to), so it never has to trust a digest
sent by the centre. Add the printed value to site.approved_bundles; the daemon
then runs that bundle and refuses every other one.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app", type=Path, help="Folder of the reviewed fedseg release (default: this install).")


def run(args: argparse.Namespace) -> int:
    from common.bundle import PYPROJECT, app_dir, bundle_sha256

    app = app_dir(args.app or "")
    if not (app / PYPROJECT).is_file():
        from common.cli import UserError

        raise UserError(f"{app} holds no {PYPROJECT}; pass --app with the folder of a fedseg release.")
    digest = bundle_sha256(app)
    print(
        f"app bundle of {app}:\n  sha256 {digest}\nAdd it to site.yaml:\n  site:\n    approved_bundles:\n"
        f"      - {digest}"
    )
    return 0
