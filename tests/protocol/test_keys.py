"""CurveZMQ: the keys CLI, authorised and unknown clients, the key the server sees."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from protocol.keys import (
    authorize,
    create_client_keys,
    create_server_keys,
    load_client_keys,
    load_public_key,
    load_server_keys,
)
from protocol.messages import Message, reply_to
from protocol.transport import ClientSocket, ServerSocket

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "tcp://127.0.0.1:0"


def keys_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "protocol.keys", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server folder with one authorised client, and one client it does not know."""
    server_dir, good_dir, stranger_dir = tmp_path / "server", tmp_path / "good", tmp_path / "stranger"
    create_server_keys(server_dir)
    create_client_keys(good_dir)
    create_client_keys(stranger_dir)
    authorize(server_dir, good_dir / "client.key")
    return {"server": server_dir, "good": good_dir, "stranger": stranger_dir}


def answer_one(server: ServerSocket, client: ClientSocket, request: Message) -> tuple[Message, str | None]:
    """Client sends `request`; the server answers it; returns (reply, key the server saw)."""
    client.send(request)
    incoming = server.recv(5000)
    assert incoming is not None and incoming.message is not None
    assert server.send(incoming.peer, reply_to(incoming.message, "pong"))
    reply = client.recv(5000)
    assert reply is not None
    return reply, incoming.client_key


def test_cli_makes_the_key_folders(tmp_path: Path) -> None:
    server_dir, client_dir = tmp_path / "srv", tmp_path / "cli"
    made = keys_cli("server", str(server_dir))
    assert made.returncode == 0, made.stderr
    assert (server_dir / "server.key").is_file() and (server_dir / "authorized_clients").is_dir()
    assert stat.S_IMODE((server_dir / "server.key_secret").stat().st_mode) == 0o600
    assert keys_cli("client", str(client_dir)).returncode == 0
    assert (client_dir / "client.key").is_file() and (client_dir / "client.key_secret").is_file()
    assert "secret-key" not in (client_dir / "client.key").read_text()

    authorised = keys_cli("authorize", str(server_dir), str(client_dir / "client.key"))
    assert authorised.returncode == 0, authorised.stderr
    copies = list((server_dir / "authorized_clients").glob("*.key"))
    assert [load_public_key(c) for c in copies] == [load_client_keys(client_dir)[0]]

    again = keys_cli("server", str(server_dir))
    assert again.returncode == 1 and "--force" in again.stderr
    public_before = load_server_keys(server_dir)[0]
    assert keys_cli("server", str(server_dir), "--force").returncode == 0
    assert load_server_keys(server_dir)[0] != public_before


def test_authorize_refuses_secret_files_and_missing_folders(tmp_path: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="secret key"):
        authorize(keys["server"], keys["stranger"] / "client.key_secret")
    with pytest.raises(FileNotFoundError, match="authorized_clients"):
        authorize(tmp_path / "nowhere", keys["stranger"] / "client.key")
    with pytest.raises(FileNotFoundError, match="server.key_secret"):
        load_server_keys(tmp_path / "nowhere")
    (tmp_path / "junk.key").write_text("not a key\n")
    with pytest.raises(ValueError, match="junk.key"):
        load_public_key(tmp_path / "junk.key")
    failed = keys_cli("authorize", str(keys["server"]), str(tmp_path / "absent.key"))
    assert failed.returncode == 1 and "absent.key" in failed.stderr


def test_authorised_client_talks_and_the_server_sees_its_key(keys: dict[str, Path]) -> None:
    server_public, _ = load_server_keys(keys["server"])
    with ServerSocket(LOOPBACK, keys["server"]) as server:
        assert server.socket.curve_server == 1
        with ClientSocket(server.bound_address, server_public_key=server_public.decode(), client_keys_dir=keys["good"]) as client:
            reply, client_key = answer_one(server, client, Message("ping"))
            assert reply.type == "pong"
            assert client_key == load_client_keys(keys["good"])[0].decode("ascii")


def test_unknown_client_key_gets_no_reply(keys: dict[str, Path]) -> None:
    server_public, _ = load_server_keys(keys["server"])
    with ServerSocket(LOOPBACK, keys["server"]) as server:
        with ClientSocket(server.bound_address, server_public_key=server_public, client_keys_dir=keys["stranger"]) as client:
            with pytest.raises(TimeoutError, match="refused this client's key"):
                client.request(Message("ping"), timeout_s=3)
        assert server.recv(200) is None


def test_a_client_without_keys_cannot_reach_a_curve_server(keys: dict[str, Path]) -> None:
    with ServerSocket(LOOPBACK, keys["server"]) as server:
        with ClientSocket(server.bound_address) as client:
            with pytest.raises(TimeoutError, match="handshake failed"):
                client.request(Message("ping"), timeout_s=5)
        assert server.recv(100) is None


def test_a_wrong_server_key_fails_the_handshake(keys: dict[str, Path], tmp_path: Path) -> None:
    create_server_keys(tmp_path / "impostor")
    wrong_public, _ = load_server_keys(tmp_path / "impostor")
    with ServerSocket(LOOPBACK, keys["server"]) as server:
        with ClientSocket(server.bound_address, server_public_key=wrong_public, client_keys_dir=keys["good"]) as client:
            with pytest.raises(TimeoutError, match="handshake failed"):
                client.request(Message("ping"), timeout_s=5)
        assert server.recv(100) is None


def test_reload_authorized_lets_a_new_client_in(keys: dict[str, Path]) -> None:
    server_public, _ = load_server_keys(keys["server"])
    with ServerSocket(LOOPBACK, keys["server"]) as server:
        authorize(keys["server"], keys["stranger"] / "client.key")
        server.reload_authorized()
        with ClientSocket(server.bound_address, server_public_key=server_public, client_keys_dir=keys["stranger"]) as client:
            reply, client_key = answer_one(server, client, Message("ping"))
            assert client_key == load_client_keys(keys["stranger"])[0].decode()


def test_curve_arguments_are_checked(keys: dict[str, Path], tmp_path: Path) -> None:
    server_public, _ = load_server_keys(keys["server"])
    with pytest.raises(ValueError, match="client_keys_dir is missing"):
        ClientSocket("tcp://127.0.0.1:1", server_public_key=server_public)
    with pytest.raises(ValueError, match="server_public_key is missing"):
        ClientSocket("tcp://127.0.0.1:1", client_keys_dir=keys["good"])
    with pytest.raises(ValueError, match="40 z85 characters"):
        ClientSocket("tcp://127.0.0.1:1", server_public_key="short", client_keys_dir=keys["good"])
    with pytest.raises(FileNotFoundError, match="client.key_secret"):
        ClientSocket("tcp://127.0.0.1:1", server_public_key=server_public, client_keys_dir=tmp_path)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "server.key_secret").write_bytes((keys["server"] / "server.key_secret").read_bytes())
    with pytest.raises(FileNotFoundError, match="authorized_clients"):
        ServerSocket(LOOPBACK, tmp_path / "bare")


def test_non_loopback_bind_with_keys_is_allowed(keys: dict[str, Path]) -> None:
    with ServerSocket("tcp://0.0.0.0:0", keys["server"]) as server:
        assert server.socket.getsockopt(zmq.CURVE_SERVER) == 1
