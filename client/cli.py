"""``fedseg-client``: what each hospital runs."""

from __future__ import annotations

import sys

from common.cli import make_main

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with add_arguments/run, one-line help)
    "start": ("client.daemon", "Run this site's SuperNode daemon (TLS, node key, bundle guard)."),
    "keygen": ("client.keygen", "Create this site's node-authentication key pair."),
    "status": ("client.status", "Show what this site has done: rounds, metrics, what it sent."),
    "approve": ("client.approve", "Print the SHA-256 of a reviewed app bundle for site.approved_bundles."),
    "audit": ("client.audit", "Summarize what left this site, when, and what the egress guard blocked."),
    "check": ("client.check", "Preflight: open every case and report what would break training."),
    "predict": ("client.predict", "Segment scans with the global weights and this site's norm tensors."),
    "report": (
        "client.site_report",
        "Draw this site's validation cases with the model's segmentation (PNG, kept here).",
    ),
    "export": ("client.export", "Write this site's own model (global weights + its norm tensors) to a folder."),
}

main = make_main("fedseg-client", "A hospital's site in a fedseg federation.", COMMANDS)

if __name__ == "__main__":
    sys.exit(main())
