"""Alembic migrations for Converge's own `converge_*` tables (version table `converge_alembic_version`)."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
VERSION_TABLE = "converge_alembic_version"


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001 - alembic's hook signature
    """Autogenerate sees Converge's tables only; Optuna's schema is Optuna's."""
    if type_ == "table":
        return bool(name) and name.startswith("converge_") and name != VERSION_TABLE
    table = getattr(obj, "table", None)
    return table is None or table.name.startswith("converge_")
