"""Read-only views of the two Optuna tables Converge counts over.

Optuna's schema stays Optuna's: these Core tables are not in Converge's metadata, so
Alembic never creates or alters them. They let one GROUP BY replace a full-study read.
"""

from sqlalchemy import Column, Integer, MetaData, String, Table

_metadata = MetaData()

optuna_studies = Table(
    "studies",
    _metadata,
    Column("study_id", Integer, primary_key=True),
    Column("study_name", String(512)),
)

optuna_trials = Table(
    "trials",
    _metadata,
    Column("trial_id", Integer, primary_key=True),
    Column("number", Integer),
    Column("study_id", Integer),
    Column("state", String(8)),  # TrialState member names: RUNNING, COMPLETE, PRUNED, FAIL, WAITING
)

FINISHED_TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL")
