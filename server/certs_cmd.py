"""Create the federation CA and the server's TLS certificate, and manage the sites' public keys.

  init      create ca.crt/ca.key (once) and server.crt/server.key with SANs for --name and --ip
  add-site  put a site's OpenSSH public key (from `fedseg-client keygen`) on the allow-list
  list      show the CA, the server certificate and every registered site key

Files live in server.cert_dir (default: certs/). Give every site a copy of ca.crt;
ca.key and server.key never leave the centre.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import config_from_args

ACTIONS = ("init", "add-site", "list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="What to do (see above).")
    parser.add_argument("--dir", type=Path, help="Certificate folder; shortcut for --set server.cert_dir=DIR.")
    parser.add_argument(
        "--name", action="append", default=[], help="init: a DNS name sites use for the server (repeatable)."
    )
    parser.add_argument("--ip", action="append", default=[], help="init: an IP address sites use (repeatable).")
    parser.add_argument("--days", type=int, default=None, help="init: server certificate lifetime in days.")
    parser.add_argument("--site", help="add-site: the site's name, as in federation.sites.")
    parser.add_argument("--key", type=Path, help="add-site: the site's .pub file.")


def run(args: argparse.Namespace) -> int:
    from common.cli import UserError
    from common.pki import key_fingerprint

    from . import certs

    cfg = config_from_args(args, [f"server.cert_dir={args.dir}"] if args.dir else [])
    cert_dir = Path(cfg.server.cert_dir)
    if args.action == "init":
        days = args.days if args.days is not None else certs.SERVER_DAYS
        for line in certs.init_pki(cert_dir, args.name, args.ip, days):
            print(line)
        print(f"Give every site a copy of {cert_dir / certs.CA_CERT}; keep {certs.CA_KEY} offline.")
        return 0
    if args.action == "add-site":
        if not args.site or not args.key:
            raise UserError("add-site needs --site NAME and --key NAME.pub.")
        path = certs.add_site_key(cert_dir, args.site, args.key)
        print(f"site '{args.site}' allowed with key {key_fingerprint(certs.site_keys(cert_dir)[args.site])} ({path})")
        if args.site not in cfg.federation.sites:
            print(f"note: add '{args.site}' to federation.sites in federation.yaml so the server registers it.")
        return 0
    material = certs.check_server_material(cert_dir)
    print(f"CA:     {material.ca_cert}\nserver: {material.cert}")
    for site, key in certs.site_keys(cert_dir).items():
        listed = "" if site in cfg.federation.sites else "  (not in federation.sites)"
        print(f"site    {site:<20} {key_fingerprint(key)}{listed}")
    return 0
