"""`converge db upgrade`: create or upgrade Optuna's schema, then Converge's.

This is the only place tables are created; at run time everything opens the
database with `skip_table_creation=True` and checks that the schema is current.
"""

from __future__ import annotations

import logging
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from converge.core.db.engine import get_engine, safe_url, translate_db_error
from converge.core.errors import SchemaNotReady

# Alembic announces its dialect at INFO on every schema check; that is noise in service logs.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

# Converge's own Alembic version table: Optuna keeps `alembic_version` for its schema.
VERSION_TABLE = "converge_alembic_version"


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001 - alembic's hook signature
    """Autogenerate sees Converge's tables only; Optuna's schema is Optuna's."""
    if type_ == "table":
        return bool(name) and name.startswith("converge_") and name != VERSION_TABLE
    table = getattr(obj, "table", None)
    return table is None or table.name.startswith("converge_")


def migrations_dir() -> str:
    """Where the Alembic scripts are: the `converge.migrations` package, named by string because
    the foundation sits below it (the migrations import the models, not the other way)."""
    return str(files("converge.migrations"))


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", migrations_dir())
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def converge_head() -> str:
    head = ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def upgrade_optuna(url: str) -> str:
    """Create Optuna's tables on an empty database, or migrate them to this Optuna's head."""
    import optuna

    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
    if storage.get_current_version() != storage.get_head_version():
        storage.upgrade()
    version = storage.get_current_version()
    storage.engine.dispose()
    return version


def upgrade_converge(url: str) -> str:
    engine = get_engine(url)
    config = _alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return converge_head()


def upgrade(url: str) -> dict[str, str]:
    """Bring both schemas to head; idempotent. Returns the versions now in place."""
    try:
        return {"optuna": upgrade_optuna(url), "converge": upgrade_converge(url)}
    except OperationalError as exc:
        raise translate_db_error(exc, url) from None


def check_schema(url: str) -> None:
    """Raise SchemaNotReady unless both schemas are at head; DatabaseUnavailable if unreachable."""
    try:
        with get_engine(url).connect() as connection:
            tables = set(inspect(connection).get_table_names())
            current = None
            if VERSION_TABLE in tables:
                context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
                current = context.get_current_revision()
    except OperationalError as exc:
        raise translate_db_error(exc, url) from None
    if "alembic_version" not in tables or current is None:
        raise SchemaNotReady(f"database {safe_url(url)} is not initialised: run `converge db upgrade`")
    if current != converge_head():
        raise SchemaNotReady(
            f"database {safe_url(url)} has Converge schema {current}, this version needs {converge_head()}: "
            "run `converge db upgrade`"
        )
