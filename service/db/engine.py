"""Engines and the one `session_scope()` that commits, rolls back and translates errors.

SQLite gets WAL and a busy timeout on every connection so that the API and worker
processes can write at once; driver errors become the service's own errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from service.db.errors import DatabaseUnavailable, SchemaNotReady


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def safe_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def engine_kwargs(url: str, busy_timeout_s: float = 30.0) -> dict[str, Any]:
    """Keyword arguments for `create_engine`, shared with Optuna's RDBStorage."""
    if is_sqlite(url):
        return {"connect_args": {"timeout": busy_timeout_s, "check_same_thread": False}}
    # pre_ping: a PostgreSQL restart must not leave dead connections in the pool.
    return {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 5}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str, busy_timeout_s: float = 30.0) -> Engine:
    """One engine per URL and process (engines hold the connection pool)."""
    engine = create_engine(url, **engine_kwargs(url, busy_timeout_s))
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@lru_cache(maxsize=8)
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def translate_db_error(exc: DBAPIError, url: str | URL) -> Exception:
    """Map a driver error to a one-line service error, or return it unchanged."""
    text = " ".join(str(exc.orig if exc.orig is not None else exc).split())
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return SchemaNotReady(f"database {safe_url(url)} is not initialised: run `converge db upgrade` ({text})")
    if isinstance(exc, OperationalError) and "locked" not in text:
        return DatabaseUnavailable(f"cannot use database {safe_url(url)}: {text}")
    return exc


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error, driver errors translated."""
    session = _session_factory(engine)()
    try:
        yield session
        session.commit()
    except (OperationalError, ProgrammingError) as exc:
        session.rollback()
        translated = translate_db_error(exc, engine.url)
        if translated is exc:
            raise
        raise translated from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


__all__ = ["DatabaseUnavailable", "SchemaNotReady", "get_engine", "session_scope", "safe_url", "engine_kwargs"]
