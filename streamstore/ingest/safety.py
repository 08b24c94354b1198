"""What the ingest daemon refuses: remote binds, escaping paths, symlinks.

An ingest service on a microscope network receives whatever arrives on its
port and writes where the sender's ``series_id`` says. These checks keep both
on a short leash:

* :func:`check_bind_endpoint` lets a socket bind only to loopback (or a local
  ``ipc://`` / ``inproc://`` endpoint) unless remote binding was asked for;
* :func:`candidate_paths` turns a series id into ``DIR/<id>.h5`` and then
  ``DIR/<id>-1.h5``, ``DIR/<id>-2.h5``, ... without ever leaving ``DIR``;
* :func:`is_free` says whether a path can be created: nothing, not even a
  dangling symlink, may sit there (the writer then creates it exclusively,
  which never follows a symlink).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

from streamstore.errors import UserError

__all__ = ["check_bind_endpoint", "is_loopback_endpoint", "candidate_paths", "is_free"]


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``, ``inproc://`` and tcp endpoints on a loopback address.

    ``tcp://*:port``, ``tcp://0.0.0.0:port``, interface names and any other
    host are not loopback.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if ";" in host:  # source-address syntax "src;dst": judge the local part
        host = host.split(";", 1)[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_endpoint(endpoint: str, allow_remote: bool, what: str = "--listen") -> None:
    """Raise :class:`UserError` if binding ``endpoint`` would accept remote peers.

    Parameters
    ----------
    endpoint : str
        A ZeroMQ endpoint to bind.
    allow_remote : bool
        The operator asked for remote binding explicitly (``--allow-remote``).
    what : str
        The option name, for the message.
    """
    if "://" not in endpoint:
        raise UserError(
            f"{what}: {endpoint!r} is not a ZeroMQ endpoint (e.g. tcp://127.0.0.1:5555)"
        )
    if not allow_remote and not is_loopback_endpoint(endpoint):
        raise UserError(
            f"{what} {endpoint} would accept connections from other hosts; "
            "bind to tcp://127.0.0.1:PORT, or pass --allow-remote to bind it on purpose"
        )


def _check_series_id(series_id: str) -> None:
    # validate_series_id (protocol) is the one rule; it is checked again right where
    # the path is built, as the last line of defence against a path outside DIR
    from streamstore.link.protocol import ProtocolError, validate_series_id

    try:
        validate_series_id(series_id)
    except ProtocolError:
        raise ValueError(
            f"series_id {series_id!r} cannot name a file inside the output directory"
        ) from None


def candidate_paths(out_dir: str | os.PathLike, series_id: str) -> Iterator[Path]:
    """``DIR/<id>.h5``, then ``DIR/<id>-1.h5``, ``DIR/<id>-2.h5``, ... (endless).

    Raises
    ------
    ValueError
        If ``series_id`` could name anything outside ``out_dir``.
    """
    _check_series_id(series_id)
    base = Path(out_dir)
    yield base / f"{series_id}.h5"
    k = 1
    while True:
        yield base / f"{series_id}-{k}.h5"
        k += 1


def is_free(path: Path) -> bool:
    """True when nothing at all, not even a dangling symlink, is at ``path``."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False
