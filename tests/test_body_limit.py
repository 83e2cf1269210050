"""The request body cap (`CONVERGE_MAX_BODY_BYTES`, `service.api.limits`): a JSON 413 on every path, the
dashboard's included, answered before the body is read when Content-Length says so, and as soon as a body
without one outgrows the limit. Through the ASGI app, and through a real uvicorn on a loopback port for what
only a socket shows (the answer comes before the body was sent)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.service.api.limits import BodySizeLimit

LIMIT = 1000
HISTORY = {"epochs": [{"epoch": 0, "train_loss": 2.3}, {"epoch": 1, "train_loss": 1.9}]}


def _detail(size: int, *, complete: bool = True) -> str:
    size_text = f"{size} bytes" if complete else f"at least {size} bytes"
    return f"the request body is {size_text}; the limit is {LIMIT} (CONVERGE_MAX_BODY_BYTES)"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    url = f"sqlite:///{tmp_path_factory.mktemp('limit') / 'converge.db'}"
    upgrade(url)
    return Settings(database_url=url, max_body_bytes=LIMIT)


@pytest.fixture(scope="module")
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def _padded(size: int) -> bytes:
    """A valid history of exactly `size` bytes (an ignored key pads it)."""
    body = json.dumps({**HISTORY, "pad": ""}).encode()
    return json.dumps({**HISTORY, "pad": "x" * (size - len(body))}).encode()


def test_the_default_is_one_mebibyte_and_the_environment_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_body_bytes == 1_048_576
    monkeypatch.setenv("CONVERGE_MAX_BODY_BYTES", "2048")
    assert Settings().max_body_bytes == 2048
    with pytest.raises(ValueError):
        BodySizeLimit(lambda *_: None, 0)  # type: ignore[arg-type,return-value]


def test_a_body_at_the_limit_passes_and_one_byte_more_is_a_413(client: TestClient) -> None:
    assert client.post("/v1/diagnose", content=_padded(LIMIT), headers={"content-type": "application/json"},
                       ).status_code == 200
    refused = client.post("/v1/diagnose", content=_padded(LIMIT + 1), headers={"content-type": "application/json"})
    assert refused.status_code == 413
    assert refused.json() == {"detail": _detail(LIMIT + 1)}
    assert refused.headers["connection"] == "close"


@pytest.mark.parametrize("path", ["/v1/studies", "/v1/diagnose", "/v1/studies/x/cancel", "/v1/health",
                                  "/api/studies", "/dashboard", "/no/such/path"])
def test_every_path_refuses_a_large_declared_body(client: TestClient, path: str) -> None:
    response = client.post(path, content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": _detail(5002)}


@pytest.mark.parametrize("path", ["/v1/diagnose", "/v1/studies", "/api/studies"])
def test_a_body_without_content_length_is_counted_as_it_is_read(client: TestClient, path: str) -> None:
    """A generator body goes out chunked, without Content-Length: the cap counts what the app reads, and the
    answer is the 413 whatever the app (FastAPI, optuna-dashboard through a2wsgi) made of the cut body."""
    def chunks() -> Iterator[bytes]:
        yield b'{"pad": "' + b"x" * 3000 + b'"}'

    response = client.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": _detail(3011, complete=False)}


def test_the_cap_comes_before_authentication(settings: Settings, tmp_path: Path) -> None:
    """A large body is refused before its token is looked at (like a body that is not JSON, it reveals nothing)."""
    from converge.core.db.engine import get_engine
    from converge.service import auth

    url = f"sqlite:///{tmp_path / 'auth.db'}"
    upgrade(url)
    auth.create_token(get_engine(url), "read")
    client = TestClient(create_app(Settings(database_url=url, max_body_bytes=LIMIT)))
    assert client.post("/v1/diagnose", json=HISTORY).status_code == 401
    assert client.post("/v1/diagnose", content=_padded(LIMIT + 1)).status_code == 413


# ---------------------------------------------------------------- over a socket


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[int]:
    """The app on a real uvicorn, in a thread, on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    served = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not served.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield port
    served.should_exit = True
    thread.join(timeout=30)


def _exchange(port: int, head: str, *body: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send a request head and the given body parts (never more), then read the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body:
            conn.sendall(part)
        received = b""
        while chunk := conn.recv(65536):  # the server closes the connection after its 413
            received += chunk
    head_bytes, _, payload = received.partition(b"\r\n\r\n")
    status, *lines = head_bytes.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, payload


def test_a_declared_size_is_answered_before_the_body_is_sent(server: int) -> None:
    """Expect: 100-continue, and not a byte of the body: the 413 comes at once, without a 100 Continue first."""
    status, headers, payload = _exchange(
        server, "POST /v1/diagnose HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                "Content-Length: 10000000\nExpect: 100-continue\n")
    assert status.startswith("HTTP/1.1 413"), status
    assert headers["connection"] == "close"
    assert json.loads(payload) == {"detail": "the request body is 10000000 bytes; the limit is 1000 "
                                             "(CONVERGE_MAX_BODY_BYTES)"}


def test_a_chunked_body_is_refused_once_it_outgrows_the_limit(server: int) -> None:
    """Three chunks of 400 bytes and no end: the 413 comes after the third, while the body is still open."""
    chunk = b"190\r\n" + b" " * 400 + b"\r\n"  # 0x190 = 400
    status, headers, payload = _exchange(
        server, "POST /v1/diagnose HTTP/1.1\nHost: test\nContent-Type: application/json\n"
                "Transfer-Encoding: chunked\n", chunk, chunk, chunk)
    assert status.startswith("HTTP/1.1 413"), status
    assert json.loads(payload) == {"detail": _detail(1200, complete=False)}
