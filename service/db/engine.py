"""Engines and the one `session_scope()` that commits, rolls back and translates errors.

SQLite gets WAL and a busy timeout on every connection so that the API and worker
processes can write at once; driver errors become the service's own errors.
`retry_unit_of_work()` reruns a whole unit of work through a database restart or lock.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from service.db.errors import DatabaseUnavailable, SchemaNotReady

log = logging.getLogger("converge.db")
T = TypeVar("T")

# How long work that must not be lost (a trial's epoch, its Optuna calls) waits for the database.
RETRY_WITHIN_S = 60.0


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


def _error_text(exc: DBAPIError) -> str:
    return " ".join(str(exc.orig if exc.orig is not None else exc).split())


def _is_schema_error(text: str) -> bool:
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def translate_db_error(exc: DBAPIError, url: str | URL) -> Exception:
    """Map a driver error to a one-line service error, or return it unchanged."""
    text = _error_text(exc)
    if _is_schema_error(text):
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


def is_transient(exc: BaseException) -> bool:
    """Whether the same work may succeed later: the database was unreachable or restarting
    (`DatabaseUnavailable`, a dropped connection), or SQLite was locked beyond its busy timeout.

    Follows `__cause__`, so it sees through wrappers such as Optuna's StorageInternalError.
    A missing schema, a constraint violation or a bug is not transient.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, DatabaseUnavailable):
            return True
        if isinstance(cause, DBAPIError):
            if _is_schema_error(_error_text(cause)):
                return False
            return cause.connection_invalidated or isinstance(cause, OperationalError)
        cause = cause.__cause__
    return False


def describe_cause(exc: BaseException) -> str:
    """The driver's own words for a database error, in one line, under any wrappers."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, DBAPIError):
            return _error_text(cause)
        cause = cause.__cause__
    return " ".join(str(exc).split())


def retry_transient(call: Callable[[], T], *, what: str, within_s: float = RETRY_WITHIN_S) -> T:
    """`call()`, called again after each transient error (`is_transient`) until `within_s` has passed.

    The waits grow from 0.1 s to 2 s (a restarted server is used again within 2 s of coming
    back); each retry is logged. After `within_s` the last error is raised as it was.
    """
    deadline = time.monotonic() + within_s
    delay = 0.1
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            left = deadline - time.monotonic()
            if left <= 0 or not is_transient(exc):
                raise
            log.warning("%s failed (attempt %d), retrying for up to %.0f s: %s", what, attempt, left,
                        describe_cause(exc)[:300])
            time.sleep(min(left, delay * random.uniform(0.5, 1.0)))
            delay = min(2.0, delay * 2)
            attempt += 1


def retry_unit_of_work(engine: Engine, work: Callable[[Session], T], *, what: str,
                       within_s: float = RETRY_WITHIN_S) -> T:
    """`work(session)` in its own `session_scope`, run again from the start after a transient error.

    Each attempt gets a fresh session, so a retry never continues a half-written transaction:
    `work` must be safe to run again after a rollback (read, then write; no side effects
    outside the session). For the writes a running trial must not lose across a PostgreSQL
    restart or a SQLite lock; the API does not retry (it answers 503 at once).
    """
    def attempt() -> T:
        with session_scope(engine) as session:
            return work(session)

    return retry_transient(attempt, what=what, within_s=within_s)


__all__ = ["DatabaseUnavailable", "SchemaNotReady", "get_engine", "session_scope", "safe_url", "engine_kwargs",
           "describe_cause", "is_transient", "retry_transient", "retry_unit_of_work"]
