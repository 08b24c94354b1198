"""CURVE keys and authentication for camera links that cross a network.

ZeroMQ's CURVE mechanism encrypts a connection and authenticates both ends
with key pairs. streamstore uses one directory of keys (made by
``streamstore keys DIR``)::

    DIR/server.key                 the daemon's public key (give it to cameras)
    DIR/server.key_secret          the daemon's secret key (mode 0600)
    DIR/<name>.key                 a camera's public key
    DIR/<name>.key_secret          a camera's secret key (mode 0600; copy it to the camera)
    DIR/authorized_clients/*.key   the public keys the daemon lets in

The daemon (``streamstore ingest --curve-keys DIR``) is the CURVE server
whether it binds or connects: :func:`curve_server` gives its socket the
server key pair and starts a ZAP authenticator thread that admits only the
public keys in ``DIR/authorized_clients``. A sender that speaks plain TCP, or
CURVE with a key not in that directory, fails the handshake and nothing it
sends reaches the daemon. A camera socket is set up with :func:`curve_client`
before it connects or binds.

Key files are made by ``zmq.auth.create_certificates`` and read by
``zmq.auth.load_certificate`` (the ZeroMQ certificate format). Secret key
files are created with mode 0600, never overwritten, never written through a
symlink, and refused when other users can read them (as ``ssh`` refuses a
readable private key).

``zmq`` is imported inside the functions only.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamstore.errors import UserError

__all__ = [
    "AUTHORIZED_DIR",
    "SERVER_NAME",
    "DEFAULT_CLIENT_NAME",
    "KeyPairPaths",
    "make_key_pair",
    "make_keys",
    "load_public_key",
    "load_secret_key",
    "check_keys_dir",
    "ClientKeyCheck",
    "curve_server",
    "curve_client",
]

#: Subdirectory of the public keys the daemon accepts.
AUTHORIZED_DIR = "authorized_clients"
#: Base name of the daemon's key pair.
SERVER_NAME = "server"
#: Base name of the first camera key pair.
DEFAULT_CLIENT_NAME = "client"

log = logging.getLogger("streamstore.link.security")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class KeyPairPaths:
    """Where one key pair lives: ``public`` (``NAME.key``) and ``secret`` (``NAME.key_secret``)."""

    public: Path
    secret: Path


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(
            f"key name {name!r}: use 1-64 characters of [A-Za-z0-9_.-], not starting with '.'"
        )
    return name


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (never through a symlink) with ``mode`` minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UserError(f"{path} exists already; streamstore never overwrites a key") from None
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_key_pair(directory: str | os.PathLike, name: str) -> KeyPairPaths:
    """Create the CURVE key pair ``NAME.key`` / ``NAME.key_secret`` in ``directory``.

    Parameters
    ----------
    directory : path
        Existing directory.
    name : str
        Base name (1-64 characters of ``[A-Za-z0-9_.-]``).

    Returns
    -------
    KeyPairPaths

    Raises
    ------
    UserError
        If either file exists (keys are never overwritten) or the name is bad.
    """
    import zmq.auth

    _check_name(name)
    d = Path(directory)
    paths = KeyPairPaths(d / f"{name}.key", d / f"{name}.key_secret")
    for p in (paths.public, paths.secret):
        if os.path.lexists(p):
            raise UserError(f"{p} exists already; streamstore never overwrites a key")
    # zmq.auth writes with a plain open(): it would follow a symlink, overwrite
    # a file and leave the secret readable under the umask. So it writes into
    # a fresh directory beside the keys that only this user can enter (mode
    # 0700, same file system), and the files are then created here
    # exclusively with their own modes.
    with tempfile.TemporaryDirectory(prefix=".keys-", dir=d) as tmp:
        public_file, secret_file = zmq.auth.create_certificates(tmp, name)
        secret_text = Path(secret_file).read_bytes()
        public_text = Path(public_file).read_bytes()
    _write_new(paths.secret, secret_text, 0o600)
    _write_new(paths.public, public_text, 0o644)
    return paths


def make_keys(
    directory: str | os.PathLike, clients: tuple[str, ...] | list[str] = (DEFAULT_CLIENT_NAME,)
) -> dict[str, KeyPairPaths]:
    """Make the server key pair (unless it exists) and one key pair per client name.

    Each client's public key is also put in ``DIR/authorized_clients`` so a
    daemon started with ``--curve-keys DIR`` admits it.

    Parameters
    ----------
    directory : path
        Created (mode 0700) if missing.
    clients : sequence of str, default ("client",)
        Names of the camera key pairs to make.

    Returns
    -------
    dict
        ``{"server": KeyPairPaths, <client name>: KeyPairPaths, ...}``; only
        the pairs made by this call.

    Raises
    ------
    UserError
        If a client key pair of that name exists, or a name is bad.
    """
    d = Path(directory)
    if os.path.islink(d):
        raise UserError(f"{d} is a symlink; give the real key directory")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    auth = d / AUTHORIZED_DIR
    auth.mkdir(mode=0o700, exist_ok=True)
    names = [_check_name(n) for n in clients]
    if SERVER_NAME in names:
        raise UserError(f"{SERVER_NAME!r} is the daemon's key pair; choose another client name")
    if len(set(names)) != len(names):
        raise UserError(f"client names repeat: {names}")
    for n in names:
        for p in (d / f"{n}.key", d / f"{n}.key_secret", auth / f"{n}.key"):
            if os.path.lexists(p):
                raise UserError(f"{p} exists already; streamstore never overwrites a key")
    made: dict[str, KeyPairPaths] = {}
    if not os.path.lexists(d / f"{SERVER_NAME}.key_secret"):
        made[SERVER_NAME] = make_key_pair(d, SERVER_NAME)
    for n in names:
        made[n] = make_key_pair(d, n)
        _write_new(auth / f"{n}.key", made[n].public.read_bytes(), 0o644)
    return made


def _valid_z85_key(key: bytes | None) -> bool:
    """A CURVE key in Z85: 40 characters that decode to 32 bytes."""
    import zmq.utils.z85

    if key is None or len(key) != 40:
        return False
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, TypeError):  # a character outside the Z85 alphabet
        return False
    return True


def _read_key_file(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise UserError(f"key file {path} not found (make keys with `streamstore keys DIR`)")
    if want_secret:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UserError(
                f"secret key {path} can be read by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
    what = "secret" if want_secret else "public"
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError):  # unreadable, or no public-key line
        public = secret = None
    if not _valid_z85_key(public) or (want_secret and not _valid_z85_key(secret)):
        raise UserError(f"{path} holds no CURVE {what} key (Z85, 40 characters)")
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key in a ``.key`` or ``.key_secret`` file (UserError if none)."""
    return _read_key_file(Path(path), want_secret=False)[0]


def load_secret_key(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file readable only by its owner."""
    public, secret = _read_key_file(Path(path), want_secret=True)
    if secret is None:  # pragma: no cover - _read_key_file raised already
        raise UserError(f"{path} holds no CURVE secret key")
    return public, secret


def check_keys_dir(directory: str | os.PathLike) -> list[Path]:
    """Check a daemon's key directory; return the authorized public key files.

    Raises
    ------
    UserError
        Naming what is missing: the directory, the server secret key, or any
        authorized client key.
    """
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"--curve-keys {d}: no such directory (make one with `streamstore keys`)")
    load_secret_key(d / f"{SERVER_NAME}.key_secret")
    auth = d / AUTHORIZED_DIR
    keys = sorted(auth.glob("*.key")) if auth.is_dir() else []
    if not keys:
        raise UserError(
            f"--curve-keys {d}: no client public keys in {auth}; "
            "nobody could connect (make one with `streamstore keys DIR --client NAME`)"
        )
    for k in keys:
        load_public_key(k)
    return keys


class ClientKeyCheck:
    """ZAP credentials provider: admits the authorized public keys, logs the others.

    Attributes
    ----------
    allowed : set of bytes
        Z85 public keys admitted.
    refused : int
        CURVE handshakes refused so far (a wrong or unknown client key).
    """

    def __init__(self, keys: list[Path]) -> None:
        self.allowed = {load_public_key(k) for k in keys}
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator thread with the client's binary public key."""
        import zmq

        z85 = zmq.utils.z85.encode(key) if len(key) == 32 else key
        if z85 in self.allowed:
            return True
        self.refused += 1
        if self.refused <= 20 or self.refused % 1000 == 0:
            log.warning(
                "refused a CURVE client whose public key %s is not authorized (%d refused so far)",
                z85.decode("ascii", "replace"),
                self.refused,
            )
        return False


def curve_server(context: Any, socket: Any, directory: str | os.PathLike) -> Any:
    """Make ``socket`` a CURVE server admitting only ``DIR/authorized_clients/*.key``.

    Call before the socket binds or connects. Starts a ZAP authenticator
    thread on ``context``; stop it with ``.stop()`` when the socket is closed.
    A client with an unknown key is refused with a warning in the log
    (its count is ``auth.key_check.refused``); a client without CURVE fails
    the handshake inside ZeroMQ.

    Returns
    -------
    zmq.auth.thread.ThreadAuthenticator
    """
    import zmq
    from zmq.auth.thread import ThreadAuthenticator

    d = Path(directory)
    keys = check_keys_dir(d)
    public, secret = load_secret_key(d / f"{SERVER_NAME}.key_secret")
    check = ClientKeyCheck(keys)
    auth = ThreadAuthenticator(context)
    auth.key_check = check
    auth.start()
    try:
        auth.configure_curve_callback(domain="*", credentials_provider=check)
        socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
        socket.setsockopt(zmq.CURVE_SERVER, 1)
    except BaseException:
        auth.stop()
        raise
    return auth


def curve_client(
    socket: Any, directory: str | os.PathLike, name: str = DEFAULT_CLIENT_NAME
) -> None:
    """Make ``socket`` a CURVE client with key pair ``NAME`` of ``DIR`` (camera side).

    Uses ``DIR/NAME.key_secret`` and the daemon's public key
    ``DIR/server.key``. Call before the socket binds or connects.
    """
    import zmq

    d = Path(directory)
    public, secret = load_secret_key(d / f"{_check_name(name)}.key_secret")
    server = load_public_key(d / f"{SERVER_NAME}.key")
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SERVERKEY, server)
