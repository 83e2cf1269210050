"""A burst of concurrent requests through a real server: every one answered, none stuck on the pool.

Sync routes and their sync dependencies each take a thread of the server's pool (40) for every
step; the database pool has 15 connections. A request that held a connection from one step to
the next (say, a token checked in the route's session) would wait for a thread while holding it:
with more clients than connections, every connection could end up held by requests waiting for
a thread and every thread by requests waiting for a connection, until the pool's 30 s timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from benchmarks.scratch_db import free_port
from conftest import tiny_spec
from converge.core.db.engine import get_engine
from converge.core.settings import Settings
from converge.service import auth
from converge.service.api.app import create_app

pytestmark = pytest.mark.slow  # a real server

CLIENTS = 80  # more than the thread pool (40) and the connection pool (15) together
ROUNDS = 3


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[str, str]]:
    token, _ = auth.create_token(get_engine(settings.database_url), "write", "burst")
    port = free_port()
    config = uvicorn.Config(create_app(settings, dashboard=False), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", token
    server.should_exit = True
    thread.join(10)


async def _burst(base: str, token: str, paths: list[str]) -> list[int | str]:
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=20) as client:
        async def one(path: str) -> int | str:
            try:
                return (await client.get(path)).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__
        return await asyncio.gather(*(one(path) for path in paths))


def test_a_burst_of_authenticated_requests_is_answered_without_pool_waits(server: tuple[str, str]) -> None:
    base, token = server
    assert httpx.post(f"{base}/v1/studies", json=tiny_spec("burst"), headers={"Authorization": f"Bearer {token}"},
                      timeout=20).status_code == 201
    paths = ["/v1/studies/burst/trials", "/v1/studies/burst", "/v1/studies"] * (CLIENTS // 3 + 1)
    for _ in range(ROUNDS):
        started = time.monotonic()
        statuses = asyncio.run(_burst(base, token, paths[:CLIENTS]))
        elapsed = time.monotonic() - started
        assert statuses == [200] * CLIENTS, sorted(set(map(str, statuses)))
        assert elapsed < 15, f"{CLIENTS} requests took {elapsed:.1f} s: something waited on a pool"
