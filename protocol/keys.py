"""CurveZMQ key folders (PROTOCOL.md section 7), in pyzmq's certificate file format.

    python -m protocol.keys server DIR            DIR/server.key, DIR/server.key_secret, DIR/authorized_clients/
    python -m protocol.keys client DIR            DIR/client.key, DIR/client.key_secret
    python -m protocol.keys authorize SERVER_DIR CLIENT_KEY_FILE
                                                  copy a client's public key into SERVER_DIR/authorized_clients/

`*.key` files hold only a public key and may be shared; `*.key_secret` files hold the secret key too
and are readable by their owner only from their first byte (created 0600 under a temporary name,
then renamed into place). A running server reads `authorized_clients/` at start, on SIGHUP and
within a second of any change to the folder; a removed key is refused from then on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path

import zmq
import zmq.auth

SERVER_NAME = "server"
CLIENT_NAME = "client"
AUTHORIZED_DIR = "authorized_clients"


def _create(directory: Path, name: str, force: bool) -> tuple[Path, Path]:
    """Write DIR/name.key and DIR/name.key_secret; refuse to overwrite unless force."""
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    for existing in (public_file, secret_file):
        if existing.exists() and not force:
            raise FileExistsError(f"{existing} exists already; pass --force to replace the key pair")
    public, secret = zmq.curve_keypair()
    _write_key_file(secret_file, public, secret)
    _write_key_file(public_file, public, None)
    return public_file, secret_file


def _write_key_file(path: Path, public: bytes, secret: bytes | None) -> None:
    """A key file in pyzmq's certificate format; with a secret key, 0600 from its first byte."""
    kind = "Secret" if secret is not None else "Public"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now()} by Dreamloom (pyzmq format)  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret else "",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret is not None else 0o644)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_server_keys(directory: Path, force: bool = False) -> tuple[Path, Path]:
    """Server key pair plus an empty `authorized_clients/` folder; returns (public, secret) files."""
    directory = Path(directory)
    files = _create(directory, SERVER_NAME, force)
    (directory / AUTHORIZED_DIR).mkdir(exist_ok=True)
    return files


def create_client_keys(directory: Path, force: bool = False) -> tuple[Path, Path]:
    """Client key pair; returns (public, secret) files."""
    return _create(Path(directory), CLIENT_NAME, force)


def _load_pair(secret_file: Path) -> tuple[bytes, bytes]:
    if not secret_file.is_file():
        raise FileNotFoundError(f"no key file {secret_file}; create it with `python -m protocol.keys`")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except ValueError as exc:
        raise ValueError(f"{secret_file} is not a key file: {exc}") from None
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret-key line")
    return public, secret


def load_server_keys(directory: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from DIR/server.key_secret."""
    return _load_pair(Path(directory) / f"{SERVER_NAME}.key_secret")


def load_client_keys(directory: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from DIR/client.key_secret."""
    return _load_pair(Path(directory) / f"{CLIENT_NAME}.key_secret")


def load_public_key(key_file: Path) -> bytes:
    """The z85 public key in a `.key` (or `.key_secret`) file."""
    key_file = Path(key_file)
    if not key_file.is_file():
        raise FileNotFoundError(f"no key file {key_file}")
    try:
        public, _ = zmq.auth.load_certificate(key_file)
    except ValueError as exc:
        raise ValueError(f"{key_file} is not a key file: {exc}") from None
    return public


def authorized_dir(server_dir: Path) -> Path:
    """The folder of client public keys a server with keys in `server_dir` accepts."""
    return Path(server_dir) / AUTHORIZED_DIR


def authorize(server_dir: Path, client_public_key_file: Path) -> Path:
    """Copy a client's public key file into SERVER_DIR/authorized_clients/; returns the new file.

    The copy is named after the key's first 16 z85 characters, so authorising two clients whose
    files are both called `client.key` keeps both. A file holding a secret key is refused.
    """
    source = Path(client_public_key_file)
    public = load_public_key(source)
    if zmq.auth.load_certificate(source)[1] is not None:
        raise ValueError(f"{source} holds a secret key; authorise the public `.key` file instead")
    target_dir = authorized_dir(server_dir)
    if not target_dir.is_dir():
        raise FileNotFoundError(f"{target_dir} is missing; create server keys with `python -m protocol.keys server {server_dir}`")
    safe = "".join(c if c.isalnum() else "_" for c in public.decode("ascii")[:16])
    target = target_dir / f"client-{safe}.key"
    shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.keys", description="Make and authorise CurveZMQ keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("server", "make the server's key pair and authorized_clients/"), ("client", "make a client key pair")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("dir", type=Path)
        sub.add_argument("--force", action="store_true", help="replace an existing key pair")
    sub = commands.add_parser("authorize", help="let a client's public key in")
    sub.add_argument("server_dir", type=Path)
    sub.add_argument("client_key_file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "server":
            public_file, secret_file = create_server_keys(args.dir, args.force)
            print(f"server public key: {public_file}\nserver secret key: {secret_file} (keep it private)")
            print(f"authorise clients: python -m protocol.keys authorize {args.dir} CLIENT_DIR/client.key")
        elif args.command == "client":
            public_file, secret_file = create_client_keys(args.dir, args.force)
            print(f"client public key: {public_file} (give it to the server's operator)")
            print(f"client secret key: {secret_file} (keep it private)")
        else:
            target = authorize(args.server_dir, args.client_key_file)
            print(f"authorised {args.client_key_file} as {target}; a running server applies it within a second")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
