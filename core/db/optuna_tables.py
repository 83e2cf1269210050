"""Read-only views of the Optuna tables Converge reads directly.

Optuna's schema stays Optuna's: these Core tables are not in Converge's metadata, so
Alembic never creates or alters them. They let one GROUP BY replace a full-study read, and
a trial page be a few queries bounded by the page size (`repo.trial_page_rows`).

Only the columns Converge reads are declared. `state` and `value_type` are Optuna's enums
(native enum types on PostgreSQL, named as Optuna's SQLAlchemy models name them), declared
as such so comparisons with them bind correctly there. Datetimes are stored as naive UTC.
"""

from sqlalchemy import Column, DateTime, Enum, Float, Integer, MetaData, String, Table, Text

_metadata = MetaData()

TRIAL_STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")  # optuna.trial.TrialState member names
VALUE_TYPES = ("FINITE", "INF_POS", "INF_NEG")  # TrialValueModel.TrialValueType
INTERMEDIATE_VALUE_TYPES = ("FINITE", "INF_POS", "INF_NEG", "NAN")  # TrialIntermediateValueType

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
    Column("study_id", Integer),  # indexed (ix_trials_study_id); `number` is not
    Column("state", Enum(*TRIAL_STATES, name="trialstate", create_constraint=False)),
    Column("datetime_start", DateTime),
    Column("datetime_complete", DateTime),
)

optuna_trial_values = Table(
    "trial_values",
    _metadata,
    Column("trial_value_id", Integer, primary_key=True),
    Column("trial_id", Integer),  # unique with objective
    Column("objective", Integer),
    Column("value", Float(precision=53)),  # null for the infinities
    Column("value_type", Enum(*VALUE_TYPES, name="trialvaluetype", create_constraint=False)),
)

optuna_trial_params = Table(
    "trial_params",
    _metadata,
    Column("param_id", Integer, primary_key=True),
    Column("trial_id", Integer),  # unique with param_name
    Column("param_name", String(512)),
    Column("param_value", Float(precision=53)),  # the internal representation (a choice's index)
    Column("distribution_json", Text),
)

optuna_trial_user_attributes = Table(
    "trial_user_attributes",
    _metadata,
    Column("trial_user_attribute_id", Integer, primary_key=True),
    Column("trial_id", Integer),  # unique with key
    Column("key", String(512)),
    Column("value_json", Text),
)

optuna_study_system_attributes = Table(
    "study_system_attributes",
    _metadata,
    Column("study_system_attribute_id", Integer, primary_key=True),
    Column("study_id", Integer),  # unique with key
    Column("key", String(512)),
    Column("value_json", Text),
)

optuna_trial_system_attributes = Table(
    "trial_system_attributes",
    _metadata,
    Column("trial_system_attribute_id", Integer, primary_key=True),
    Column("trial_id", Integer),  # unique with key
    Column("key", String(512)),
    Column("value_json", Text),
)

optuna_trial_intermediate_values = Table(
    "trial_intermediate_values",
    _metadata,
    Column("trial_intermediate_value_id", Integer, primary_key=True),
    Column("trial_id", Integer),  # unique with step
    Column("step", Integer),
    Column("intermediate_value", Float(precision=53)),  # null for the non-finite ones
    Column("intermediate_value_type", Enum(*INTERMEDIATE_VALUE_TYPES, name="trialintermediatevaluetype",
                                           create_constraint=False)),
)

FINISHED_TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL")
