"""Alembic environment: Converge's tables only, in their own version table.

Optuna keeps `alembic_version` for its schema; autogenerate must never touch its tables.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from converge.core.db.migrate import VERSION_TABLE, include_object
from converge.core.db.models import Base


def run_migrations() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    options = dict(
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies tables
        compare_type=True,
    )
    if context.is_offline_mode():
        context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    if connection is not None:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, **options)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
