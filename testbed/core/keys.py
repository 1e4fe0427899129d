"""ZeroMQ endpoints and CURVE keys: parsing an endpoint, making keys, loading them safely.

The one home of how a relay and a delegate meet: endpoint syntax
(:func:`parse_endpoint`, :func:`is_loopback`) and the delegate's
authentication.  The delegate (server side), the relay, the CLI, experiment
plans and every health check (client side) import it.

A *keys directory* (``testbed keys new DIR``) holds ZeroMQ certificate files
in the format of ``zmq.auth`` (``public-key = "..."`` / ``secret-key = "..."``)::

    DIR/                      0700
      server.key              the delegate's public key                    0644
      server.key_secret       the delegate's key pair                      0600
      client.key              a relay's public key (no --relay given)      0644
      client.key_secret       that relay's key pair                        0600
      authorized/             public keys of the relays admitted           0700
        client.key | NAME.key
      relays/NAME/            with --relay NAME: one directory per relay   0700
        server.key, client.key, client.key_secret

``testbed delegate --curve-keys DIR`` reads ``server.key_secret`` and
``authorized/*.key``; ``testbed run --curve-keys DIR`` reads ``server.key``
and ``client.key_secret`` (DIR itself, or a ``relays/NAME`` copied to that
relay's node).  Secret files are created 0600 (never readable by anyone
else, not even for an instant) and a secret file readable by group or others
is refused on load, as is an ``authorized/`` that others may write to.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import time
from pathlib import Path

import zmq

from testbed.core.errors import TestbedError

SERVER_PUBLIC = "server.key"
SERVER_SECRET = "server.key_secret"
CLIENT_PUBLIC = "client.key"
CLIENT_SECRET = "client.key_secret"
AUTHORIZED = "authorized"
RELAYS = "relays"

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_BANNER = (
    "#   ****  Generated on {when} by testbed keys  ****\n"
    "#   ZeroMQ CURVE {kind} Certificate\n"
    "{warning}\n"
)


class KeyFileError(TestbedError):
    """A keys directory or key file is missing, malformed or unsafe."""


# ---------------------------------------------------------------- writing


def _write_cert(path: Path, public: bytes, secret: bytes | None) -> None:
    """Write one certificate file, created with its final mode (O_EXCL: never overwrite)."""
    kind, warning = ("Secret", "#   Keep this file secret: mode 0600, never copy it to another user.") \
        if secret else ("Public", "#   Public key: safe to copy.")  # fmt: skip
    body = _BANNER.format(when=time.strftime("%Y-%m-%d %H:%M:%S"), kind=kind, warning=warning)
    body += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret:
        body += f'    secret-key = "{secret.decode()}"\n'
    mode = SECRET_MODE if secret else PUBLIC_MODE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits; never added any
        os.write(fd, body.encode())
    finally:
        os.close(fd)


def _make_dir(path: Path, created: list[str]) -> None:
    if path.is_symlink():
        raise KeyFileError(f"{path} is a symbolic link; a keys directory must be a real directory")
    if not path.exists():
        path.mkdir(mode=DIR_MODE)
        os.chmod(path, DIR_MODE)
        created.append(f"created {path}/")
    elif not path.is_dir():
        raise KeyFileError(f"{path} exists and is not a directory")
    elif stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
        created.append(f"tightened {path}/ to 0700")


def _pair(directory: Path, name: str, created: list[str]) -> bytes:
    """Ensure directory/NAME.key and NAME.key_secret; return the public key."""
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    have_public, have_secret = public_path.exists(), secret_path.exists()
    if have_secret:
        public, _ = load_secret(secret_path)
        if not have_public:
            _write_cert(public_path, public, None)
            created.append(f"created {public_path}")
        elif load_public(public_path) != public:
            raise KeyFileError(f"{public_path} does not match {secret_path}")
        return public
    if have_public:
        raise KeyFileError(
            f"{public_path} exists without {secret_path.name}; remove it or restore the secret"
        )
    public, secret = zmq.curve_keypair()
    _write_cert(secret_path, public, secret)
    _write_cert(public_path, public, None)
    created.append(f"created {secret_path}")
    created.append(f"created {public_path}")
    return public


def _authorize(authorized: Path, name: str, public: bytes, created: list[str]) -> None:
    path = authorized / f"{name}.key"
    if path.exists():
        if load_public(path) != public:
            raise KeyFileError(f"{path} holds another key than {name}'s; remove it to re-authorize")
        return
    _write_cert(path, public, None)
    created.append(f"created {path}")


def generate(directory: str | os.PathLike, relays: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Create what is missing in a keys directory; return one line per change.

    Never overwrites a key.  Without ``relays`` one relay pair ``client`` sits
    in DIR itself (DIR serves both sides on one machine); with them, each NAME
    gets ``relays/NAME/`` (a complete relay directory) and ``authorized/NAME.key``.
    """
    for name in relays:
        if not _NAME.fullmatch(name) or name == "server":
            raise KeyFileError(
                f"relay name {name!r}: use letters, digits, '_', '.', '-' (not 'server')"
            )
    root = Path(directory)
    created: list[str] = []
    try:
        root.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _generate(root, relays, created)
    except OSError as exc:
        where = "" if str(exc.filename or root) == str(root) else f"{exc.filename}: "
        raise KeyFileError(f"keys directory {root}: {where}{exc.strerror}") from None
    return created


def _generate(root: Path, relays: list[str] | tuple[str, ...], created: list[str]) -> None:
    _make_dir(root, created)
    server_public = _pair(root, "server", created)
    authorized = root / AUTHORIZED
    _make_dir(authorized, created)
    if not relays:
        _authorize(authorized, "client", _pair(root, "client", created), created)
    for name in relays:
        rdir = root / RELAYS
        _make_dir(rdir, created)
        _make_dir(rdir / name, created)
        public = _pair(rdir / name, "client", created)
        server_copy = rdir / name / SERVER_PUBLIC
        if not server_copy.exists():
            _write_cert(server_copy, server_public, None)
            created.append(f"created {server_copy}")
        elif load_public(server_copy) != server_public:
            raise KeyFileError(f"{server_copy} is not the public key of {root / SERVER_SECRET}")
        _authorize(authorized, name, public, created)


def make_curve_keys(directory: str | os.PathLike) -> None:
    """One server and one relay key pair in ``directory`` (both sides on one machine)."""
    generate(directory)


# ---------------------------------------------------------------- loading


def check_secret_mode(path: str | os.PathLike) -> None:
    """Refuse a secret key file that is not a regular file or that group/others may read."""
    try:
        st = os.stat(path, follow_symlinks=True)
    except FileNotFoundError:
        raise KeyFileError(f"CURVE secret key {path}: no such file") from None
    except OSError as exc:
        raise KeyFileError(f"CURVE secret key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"CURVE secret key {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"CURVE secret key {path} is accessible by group or others (mode {mode:04o}); "
            f"refusing it: chmod 600 {path} (and make a new key if others may have read it)"
        )


def _load(path: Path) -> tuple[bytes, bytes | None]:
    import zmq.auth  # lazy: zmq.auth (22-58 ms with its thread), CURVE only

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read CURVE certificate {path}: {exc}") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"CURVE certificate {path}: keys must be 40 Z85 characters")
    return public, secret


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) of a secret certificate, after checking its mode."""
    check_secret_mode(path)
    public, secret = _load(Path(path))
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key")
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    return _load(Path(path))[0]


def _check_authorized(authorized: Path) -> list[Path]:
    try:
        st = authorized.stat()
    except FileNotFoundError:
        raise KeyFileError(f"no authorized relay keys: {authorized} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{authorized} is not a directory")
    if st.st_mode & 0o022:
        raise KeyFileError(
            f"{authorized} may be written by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"anyone could authorize a key: chmod go-w {authorized}"
        )
    keys = sorted(p for p in authorized.iterdir() if p.name.endswith(".key"))
    if not keys:
        raise KeyFileError(f"no authorized relay keys in {authorized} (*.key)")
    for p in keys:
        load_public(p)  # a malformed file is an error here, not a silent skip later
    return keys


# ---------------------------------------------------------------- sockets


def setup_server(ctx: zmq.Context, sock: zmq.Socket, directory: str | os.PathLike):
    """Make ``sock`` a CURVE server admitting only DIR/authorized/*.key.

    Returns the running ``ThreadAuthenticator`` (stop it when the socket closes).
    Everything is read here, so the caller may drop privileges afterwards.
    """
    from zmq.auth.thread import ThreadAuthenticator  # lazy: 58 ms (asyncio), CURVE servers only

    root = Path(directory)
    public, secret = load_secret(root / SERVER_SECRET)
    authorized = root / AUTHORIZED
    _check_authorized(authorized)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def setup_client(sock: zmq.Socket, directory: str | os.PathLike) -> None:
    """Make ``sock`` a CURVE client of the delegate whose DIR/server.key it holds.

    Reads DIR/server.key and DIR/client.key_secret; call before ``connect``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise KeyFileError(f"CURVE keys directory {root}: no such directory")
    server_public = load_public(root / SERVER_PUBLIC)
    public, secret = load_secret(root / CLIENT_SECRET)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


# ---------------------------------------------------------------- endpoints


class EndpointError(TestbedError):
    """An endpoint that is not tcp://HOST:PORT, ipc://PATH or inproc://NAME."""


def parse_endpoint(text: str, connect: bool = False) -> str:
    """A ZeroMQ endpoint, normalised: HOST:PORT gets ``tcp://``.

    A TCP port is 0-65535 or ``*`` (libzmq would wrap a larger one silently);
    with ``connect`` it must be 1-65535 (a port to connect to).
    """
    if "://" not in text:
        text = "tcp://" + text
    scheme, _, rest = text.partition("://")
    if scheme not in ("tcp", "ipc", "inproc", "shm") or not rest:
        raise EndpointError(f"{text!r} is not a tcp://HOST:PORT, ipc://PATH or shm://PATH endpoint")
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not (port.isdigit() or port == "*"):
            raise EndpointError(f"{text!r}: expected tcp://HOST:PORT")
        if port != "*" and not 0 <= int(port) <= 65535:
            raise EndpointError(f"{text!r}: port must be 0-65535")
        if connect and (port == "*" or int(port) == 0):
            raise EndpointError(f"{text!r}: connect needs a port 1-65535")
    return text


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, shm://, inproc:// and tcp:// endpoints bound to a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc", "shm"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface or host name: beyond loopback
        return False


def exposure_warning(endpoint: str, curve_keys: str | None) -> str | None:
    """The warning a delegate prints when it listens beyond loopback without CURVE."""
    if curve_keys or is_loopback(endpoint):
        return None
    return (
        f"testbed delegate: warning: {endpoint} is reachable beyond loopback without "
        "authentication; anyone who reaches it can use and stop this delegate "
        "(use --curve-keys, see docs/security.md)"
    )
