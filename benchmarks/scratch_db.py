"""Scratch resources for a benchmark or test run: a PostgreSQL database created on 127.0.0.1:5432 and
dropped at the end, and a free local port for a server to listen on."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

from converge.core.db.engine import get_engine

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scratch_database(url: str | None) -> Iterator[str]:
    """`url` as it is when given; else a new database (`new_database`), dropped afterwards."""
    if url is not None:
        yield url
        return
    with new_database(sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT"), "converge_bench") as url:
        yield url


@contextlib.contextmanager
def new_database(admin: sa.Engine, prefix: str) -> Iterator[str]:
    """A new, empty database on `admin`'s server (an AUTOCOMMIT engine); its engine's connections
    closed and the database dropped afterwards, retried: a server restarted meanwhile drops the
    admin connection. Also the tests' scratch databases (tests/conftest.py)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        get_engine(url).dispose()
        for attempt in range(5):
            try:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                break
            except sa.exc.OperationalError:
                if attempt == 4:
                    print(f"could not drop the scratch database {name}: drop it by hand", file=sys.stderr)
                    raise
                time.sleep(2)
