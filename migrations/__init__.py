"""Alembic migrations for Converge's own `converge_*` tables (version table `converge_alembic_version`)."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
VERSION_TABLE = "converge_alembic_version"
