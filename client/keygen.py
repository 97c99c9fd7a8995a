"""Create this site's node-authentication key pair (EC P-384, OpenSSH form, as Flower 1.42 reads it).

The private key is written to site.private_key with mode 0600 and never leaves
the site; send only the printed .pub file to the coordinating centre, which
adds it with `fedseg-server certs add-site`. An existing key is never replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import UserError, config_from_args

DEFAULT_KEY = "keys/site.key"
"""Where the key goes when site.private_key is empty: inside the site's state folder."""


def key_path(private_key: str, state_dir: str) -> Path:
    if private_key:
        return Path(private_key)
    if not state_dir:
        raise UserError("set site.private_key (or site.state_dir) in site.yaml so the key has a home.")
    return Path(state_dir) / DEFAULT_KEY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="Private key path; shortcut for --set site.private_key=PATH.")


def run(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.pki import key_fingerprint, openssh_public, write_private

    cfg = config_from_args(args, [f"site.private_key={args.out}"] if args.out else [])
    private = key_path(cfg.site.private_key, cfg.site.state_dir)
    public = private.with_name(private.name + ".pub")
    if public.exists() and not private.exists():
        raise UserError(f"{public} exists without its private key; move it away first.")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    comment = f" fedseg-site-{cfg.site.name}" if cfg.site.name else ""
    public.write_bytes(openssh_public(key.public_key()) + comment.encode() + b"\n")
    print(
        f"private key: {private} (mode 0600; keep it here)\npublic key:  {public}\n"
        f"fingerprint: {key_fingerprint(key.public_key())}"
    )
    print(
        f"Send {public.name} to the coordinating centre; it runs "
        f"`fedseg-server certs add-site --site {cfg.site.name or 'NAME'} --key {public.name}`."
    )
    if not cfg.site.private_key:
        print(f"Set site.private_key: {private} in site.yaml.")
    return 0
