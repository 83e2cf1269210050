"""Engines and the one `session_scope()` that commits, rolls back and translates errors.

SQLite gets WAL and a busy timeout on every connection so that the API and worker
processes can write at once; driver errors become the service's own errors (a write refused
by a read-only database or a full disk: `DatabaseNotWritable`).
`retry_unit_of_work()` reruns a whole unit of work through a database restart or lock.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from converge.core.errors import DatabaseNotWritable, DatabaseUnavailable, SchemaNotReady, ServiceError

log = logging.getLogger("converge.db")
T = TypeVar("T")

# How long work that must not be lost (a trial's epoch, its Optuna calls) waits for the database
# (read at each call: see also `waiting_at_most`).
RETRY_WITHIN_S = 60.0
_WAIT_AT_MOST: ContextVar[float | None] = ContextVar("converge_db_wait_at_most", default=None)

# Driver codes of a write the database refused although it answers (see `DatabaseNotWritable`).
_SQLITE_NOT_WRITABLE = {8, 13}  # SQLITE_READONLY (any of its extended codes), SQLITE_FULL
_POSTGRES_NOT_WRITABLE = {"25006", "53100"}  # read_only_sql_transaction, disk_full
_NOT_WRITABLE_WORDS = ("readonly database", "read-only transaction", "database or disk is full",
                       "no space left on device", "disk full")


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
    reconnect_after_refused_writes(engine)
    return engine


def reconnect_after_refused_writes(engine: Engine) -> None:
    """A write refused as read-only or for lack of space drops the engine's pooled connections, as a
    dropped connection would: a SQLite connection opened while its file was read-only stays read-only
    for its life, and a PostgreSQL session keeps the read-only default it started with, so only new
    connections see the database writable again. (Also applied to Optuna's engine: `studies.storage`.)"""
    if not event.contains(engine, "handle_error", _refused_write_is_a_disconnect):
        event.listen(engine, "handle_error", _refused_write_is_a_disconnect)


def _refused_write_is_a_disconnect(context: ExceptionContext) -> None:
    if isinstance(context.sqlalchemy_exception, DBAPIError) and is_not_writable(context.sqlalchemy_exception):
        context.is_disconnect = True


@lru_cache(maxsize=8)
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def _error_text(exc: DBAPIError) -> str:
    return " ".join(str(exc.orig if exc.orig is not None else exc).split())


def _is_schema_error(text: str) -> bool:
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def is_not_writable(exc: DBAPIError) -> bool:
    """Whether the database refused a write although it answers: a read-only SQLite file or mount,
    a read-only PostgreSQL transaction (a standby, `default_transaction_read_only`), a full disk."""
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _SQLITE_NOT_WRITABLE:
        return True
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg 3, psycopg2
    if state in _POSTGRES_NOT_WRITABLE:
        return True
    text = _error_text(exc).lower()
    return any(words in text for words in _NOT_WRITABLE_WORDS)


def translate_db_error(exc: DBAPIError, url: str | URL) -> Exception:
    """Map a driver error to a one-line service error, or return it unchanged."""
    text = _error_text(exc)
    if _is_schema_error(text):
        return SchemaNotReady(f"database {safe_url(url)} is not initialised: run `converge db upgrade` ({text})")
    if is_not_writable(exc):
        return DatabaseNotWritable(f"the database at {safe_url(url)} cannot be written: {text}")
    if isinstance(exc, OperationalError) and "locked" not in text:
        return DatabaseUnavailable(f"cannot use database {safe_url(url)}: {text}")
    return exc


def as_service_error(exc: BaseException, url: str | URL) -> ServiceError | None:
    """The service's own one-line error for a database failure however it reached the caller: a
    service error, a driver error, or one wrapped (followed along `__cause__`, e.g. in Optuna's
    StorageInternalError, which Optuna's RDBStorage raises for every driver error). None for
    anything else (a constraint violation, a bug): that is not the database's state to report."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ServiceError):
            return cause
        if isinstance(cause, DBAPIError):
            translated = translate_db_error(cause, url)
            if isinstance(translated, ServiceError):
                return translated
            if is_transient(cause):  # e.g. SQLite still locked after its busy timeout
                return DatabaseUnavailable(f"cannot use database {safe_url(url)}: {_error_text(cause)}")
            return None
        cause = cause.__cause__
    return None


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error, driver errors translated."""
    session = _session_factory(engine)()
    try:
        yield session
        session.commit()
    except DBAPIError as exc:
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
            return cause.connection_invalidated or isinstance(cause, OperationalError) or is_not_writable(cause)
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


@contextmanager
def waiting_at_most(seconds: float) -> Iterator[None]:
    """Within the block (this thread or task), `retry_transient` gives up after `seconds` at most
    (0: at the first error). For one-shot commands, which must say at once what is wrong."""
    token = _WAIT_AT_MOST.set(seconds)
    try:
        yield
    finally:
        _WAIT_AT_MOST.reset(token)


def retry_transient(call: Callable[[], T], *, what: str, within_s: float | None = None) -> T:
    """`call()`, called again after each transient error (`is_transient`) until `within_s`
    (default `RETRY_WITHIN_S`, or less within `waiting_at_most`) has passed.

    The waits grow from 0.1 s to 2 s (a restarted server is used again within 2 s of coming
    back); each retry is logged. After `within_s` the last error is raised as it was.
    """
    within_s = RETRY_WITHIN_S if within_s is None else within_s
    limit = _WAIT_AT_MOST.get()
    if limit is not None:
        within_s = min(within_s, limit)
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
                       within_s: float | None = None) -> T:
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


__all__ = ["DatabaseNotWritable", "DatabaseUnavailable", "SchemaNotReady", "get_engine", "session_scope", "safe_url",
           "engine_kwargs", "describe_cause", "is_transient", "is_not_writable", "as_service_error",
           "reconnect_after_refused_writes", "retry_transient", "retry_unit_of_work", "waiting_at_most"]
