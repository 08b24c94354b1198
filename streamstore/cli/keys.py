"""Make CURVE key pairs for an authenticated, encrypted camera link.

Creates DIR (mode 0700) with the daemon's key pair (server.key,
server.key_secret; kept if it exists) and one key pair per --client NAME
(NAME.key, NAME.key_secret), and authorizes each client's public key in
DIR/authorized_clients. Secret keys are mode 0600 and never overwritten.

Then: `streamstore ingest --curve-keys DIR ...` on the daemon host; the
camera needs NAME.key_secret and server.key.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``streamstore keys``."""
    p.add_argument("directory", metavar="DIR", help="key directory (created if missing)")
    p.add_argument(
        "--client",
        action="append",
        metavar="NAME",
        help="name of a camera key pair to make (repeatable; default: one named 'client')",
    )


def run(args: argparse.Namespace) -> int:
    """Make the keys and say where each one goes."""
    from streamstore.link.security import (
        AUTHORIZED_DIR,
        DEFAULT_CLIENT_NAME,
        SERVER_NAME,
        make_keys,
    )

    clients = args.client or [DEFAULT_CLIENT_NAME]
    made = make_keys(args.directory, clients)
    for name, pair in made.items():
        role = "daemon" if name == SERVER_NAME else "camera"
        print(f"{role} key pair {name!r}: {pair.public} (public), {pair.secret} (secret, 0600)")
    if SERVER_NAME not in made:
        print(f"kept the existing daemon key pair in {args.directory}")
    print(
        f"authorized in {args.directory}/{AUTHORIZED_DIR}: {', '.join(clients)}\n"
        f"daemon: streamstore ingest --curve-keys {args.directory} ...\n"
        f"camera: needs <NAME>.key_secret and {SERVER_NAME}.key from {args.directory}"
    )
    return 0
