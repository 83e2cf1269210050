"""Alembic migrations for Converge's own `converge_*` tables.

`converge db upgrade` runs them (`converge.core.db.migrate`); the version table's name and the
autogenerate filter live there too, so this package imports only the foundation.
"""
