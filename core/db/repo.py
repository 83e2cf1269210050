"""Repository functions: every query Converge runs on its tables. They never commit.

The caller owns the transaction through `session_scope()`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Literal

from optuna.storages._rdb.models import TrialIntermediateValueModel
from sqlalchemy import (
    Float,
    Integer,
    Row,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    null,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, defer

from converge.core.db.models import (
    ACTIVE_STATES,
    METRIC_COLUMNS,
    ApiToken,
    HealthProbe,
    Study,
    TrialDiagnosis,
    TrialMetric,
    TrialRepair,
    TrialRetry,
    Worker,
    utcnow,
)
from converge.core.db.optuna_tables import (
    FINISHED_TRIAL_STATES,
    optuna_studies,
    optuna_study_system_attributes,
    optuna_trial_intermediate_values,
    optuna_trial_params,
    optuna_trial_user_attributes,
    optuna_trial_values,
    optuna_trials,
)
from converge.core.errors import Conflict, NotFound

# ---------------------------------------------------------------- studies


def add_study(session: Session, name: str, spec: dict[str, Any], n_trials: int) -> Study:
    """Insert a queued study; Conflict if the name is taken."""
    study = Study(name=name, spec=spec, n_trials=n_trials, state="queued")
    session.add(study)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a study named {name!r} already exists") from None
    return study


def get_study(session: Session, name: str) -> Study:
    study = session.scalar(select(Study).where(Study.name == name))
    if study is None:
        raise NotFound(f"no study named {name!r}")
    return study


def list_studies(session: Session, state: str | None = None) -> list[Study]:
    query = select(Study).order_by(Study.created_at.desc(), Study.id.desc())
    if state is not None:
        query = query.where(Study.state == state)
    return list(session.scalars(query))


def count_studies(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Study)) or 0


@dataclass(frozen=True)
class ClaimedSlot:
    """One trial slot of one study, handed to exactly one worker."""

    study_id: int
    study_name: str
    spec: dict[str, Any]
    slot: int  # 0-based index of this slot within the study


def claim_trial_slot(session: Session, study_name: str | None = None) -> ClaimedSlot | None:
    """Hand out the next trial slot of the oldest active study, in one statement.

    The increment and its guard `n_claimed < n_trials` are one UPDATE, so racing workers
    can never hand out more than `n_trials` slots; on PostgreSQL `SKIP LOCKED` lets a
    second worker move on to another study instead of waiting on the row.
    """
    candidate = (
        select(Study.id)
        .where(Study.state.in_(ACTIVE_STATES), Study.n_claimed < Study.n_trials)
        .order_by(Study.created_at, Study.id)
        .limit(1)
    )
    if study_name is not None:
        candidate = candidate.where(Study.name == study_name)
    if session.get_bind().dialect.name == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    statement = (
        update(Study)
        .where(Study.id == candidate.scalar_subquery(), Study.n_claimed < Study.n_trials,
               Study.state.in_(ACTIVE_STATES))
        .values(n_claimed=Study.n_claimed + 1, state="running",
                started_at=func.coalesce(Study.started_at, utcnow()))
        .returning(Study.id, Study.name, Study.spec, Study.n_claimed)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(statement).first()
    if row is None:
        return None
    return ClaimedSlot(study_id=row.id, study_name=row.name, spec=row.spec, slot=row.n_claimed - 1)


def release_trial_slot(session: Session, study_id: int) -> None:
    """Give back a slot whose trial never started (its process died before asking Optuna)."""
    session.execute(
        update(Study).where(Study.id == study_id, Study.n_claimed > 0)
        .values(n_claimed=Study.n_claimed - 1).execution_options(synchronize_session=False)
    )


def fail_study(session: Session, study_id: int, detail: str) -> None:
    session.execute(
        update(Study).where(Study.id == study_id, Study.state.in_(ACTIVE_STATES))
        .values(state="failed", detail=detail[:4000], finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def cancel_study(session: Session, name: str) -> Study:
    """Stop a queued or running study: no trial of it is claimed again, running ones stop at their next epoch.

    NotFound for an unknown name; Conflict when the study has already ended.
    """
    study = get_study(session, name)
    result = session.execute(
        update(Study).where(Study.id == study.id, Study.state.in_(ACTIVE_STATES))
        .values(state="cancelled", detail="cancelled by a user", finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.refresh(study)
    if not result.rowcount:
        raise Conflict(f"study {name!r} is already {study.state}; only a queued or running study can be cancelled")
    return study


def study_state(session: Session, study_id: int) -> str | None:
    """The study's state, read fresh (a trial checks it every epoch to notice a cancel)."""
    return session.scalar(select(Study.state).where(Study.id == study_id))


def finish_study_if_complete(session: Session, study_id: int) -> str | None:
    """Mark a running study done (or failed, when every trial failed) once n_trials have finished.

    Returns the new state, or None while trials remain.
    """
    study = session.get(Study, study_id)
    if study is None or study.state != "running":
        return None
    if study.n_claimed < study.n_trials:  # a slot nobody has run yet: not done, and no need to count
        return None
    counts = trial_state_counts(session, [study.name]).get(study.name, Counter())
    # A failed attempt that was rerun is replaced by its retry: it is not one of the n_trials.
    finished = sum(counts[s] for s in FINISHED_TRIAL_STATES) - retried_attempts(session, study_id)
    if finished < study.n_trials:
        return None
    new_state = "failed" if counts["COMPLETE"] + counts["PRUNED"] == 0 else "done"
    detail = f"all {finished} trials failed" if new_state == "failed" else None
    result = session.execute(
        update(Study).where(Study.id == study_id, Study.state == "running")
        .values(state=new_state, finished_at=utcnow(), detail=detail)
        .execution_options(synchronize_session=False)
    )
    return new_state if result.rowcount else None


def trial_state_counts(session: Session, study_names: list[str]) -> dict[str, Counter[str]]:
    """Optuna trial counts by state for each named study, in one GROUP BY."""
    if not study_names:
        return {}
    rows = session.execute(
        select(optuna_studies.c.study_name, optuna_trials.c.state, func.count())
        .join(optuna_trials, optuna_trials.c.study_id == optuna_studies.c.study_id)
        .where(optuna_studies.c.study_name.in_(study_names))
        .group_by(optuna_studies.c.study_name, optuna_trials.c.state)
    )
    counts: dict[str, Counter[str]] = {name: Counter() for name in study_names}
    for name, state, n in rows:
        counts[name][state] = n
    return counts


# ---------------------------------------------------------------- retries


def record_retry(session: Session, study_id: int, trial_number: int, trial_id: int, retry_number: int,
                 reason: str, failures: int) -> bool:
    """Record that a failed attempt is rerun as `retry_number` and give its trial slot back.

    Both in the caller's transaction, so the slot is released exactly once: False (and nothing
    written) when the attempt was already recorded by another process.
    """
    if not _add_once(session, TrialRetry(study_id=study_id, trial_number=trial_number, trial_id=trial_id,
                                         retry_number=retry_number, reason=reason, failures=failures)):
        return False
    release_trial_slot(session, study_id)
    return True


def _add_once(session: Session, row: TrialRetry | TrialRepair) -> bool:
    """Insert a row whose unique key says "this trial was already handled"; False if it was."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return False
    return True


def get_retry(session: Session, study_id: int, trial_number: int) -> TrialRetry | None:
    return session.scalar(select(TrialRetry).where(TrialRetry.study_id == study_id,
                                                   TrialRetry.trial_number == trial_number))


def retried_attempts(session: Session, study_id: int) -> int:
    return retried_attempts_by_study(session, [study_id]).get(study_id, 0)


def retried_attempts_by_study(session: Session, study_ids: list[int]) -> dict[int, int]:
    """Rerun attempts per study, for a list of studies in one GROUP BY."""
    if not study_ids:
        return {}
    rows = session.execute(select(TrialRetry.study_id, func.count()).where(TrialRetry.study_id.in_(study_ids))
                           .group_by(TrialRetry.study_id))
    return {study_id: n for study_id, n in rows}


# ---------------------------------------------------------------- repairs


ENDED_BY_TRIALS = ("done", "failed")  # ended because its trials did, not by a user: a repair reopens it


def record_repair(session: Session, study_id: int, trial_number: int, repair_number: int, remedy: dict[str, Any],
                  params: dict[str, Any], automatic: bool = False) -> bool:
    """Record a repair and make room for its trial: one more of `n_trials`, and an ended study runs again.

    False (and nothing written) when the trial was already repaired.
    """
    if not _add_once(session, TrialRepair(study_id=study_id, trial_number=trial_number, repair_number=repair_number,
                                          remedy=_json_safe(remedy), params=_json_safe(params), automatic=automatic)):
        return False
    session.execute(
        update(Study).where(Study.id == study_id)
        .values(n_trials=Study.n_trials + 1,
                state=case((Study.state.in_(ENDED_BY_TRIALS), "running"), else_=Study.state),
                detail=case((Study.state.in_(ENDED_BY_TRIALS), None), else_=Study.detail),
                finished_at=case((Study.state.in_(ENDED_BY_TRIALS), None), else_=Study.finished_at))
        .execution_options(synchronize_session=False)
    )
    return True


def reserve_auto_repair(session: Session, study_id: int, limit: int) -> bool:
    """Take one of the study's `limit` automatic repairs, in one conditional UPDATE: two workers
    repairing at once never take more than `limit` between them. False when none is left."""
    result = session.execute(
        update(Study).where(Study.id == study_id, Study.auto_repairs < limit)
        .values(auto_repairs=Study.auto_repairs + 1)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def get_repair(session: Session, study_id: int, trial_number: int) -> TrialRepair | None:
    return session.scalar(select(TrialRepair).where(TrialRepair.study_id == study_id,
                                                    TrialRepair.trial_number == trial_number))


# ---------------------------------------------------------------- per-epoch metrics


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def record_epoch(session: Session, study_id: int, trial_id: int, trial_number: int,
                 metrics: dict[str, Any]) -> None:
    """Store one epoch's metrics (NaN and infinities kept: they are the evidence of divergence).

    Writing an epoch that is already stored changes nothing: a retried write whose first commit
    went through (and only its reply was lost) must not fail the trial.
    """
    values = dict(study_id=study_id, trial_id=trial_id, trial_number=trial_number, epoch=int(metrics["epoch"]),
                  recorded_at=utcnow(), **{name: _as_float(metrics.get(name)) for name in METRIC_COLUMNS})
    statement = _upsert(session.get_bind().dialect.name, TrialMetric)
    if statement is None:  # other databases: the ORM (a duplicate raises there)
        session.add(TrialMetric(**values))
        return
    session.execute(statement, values)


def record_intermediate_value(session: Session, trial_id: int, step: int, value: float) -> bool:
    """Optuna's intermediate value of a running trial, stored as `RDBStorage.set_trial_intermediate_value`
    stores it (a value reported again for a step replaces it), in the caller's transaction: the
    epoch's metrics and Optuna's value for it commit together, one statement where Optuna's own
    report is a transaction of three. False, with nothing written, when the trial has ended.
    """
    stored, value_type = TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
    return session.execute(_intermediate_value_upsert(session.get_bind().dialect.name),
                           {"trial_id": trial_id, "step": step, "value": stored, "value_type": value_type.name}
                           ).first() is not None


@lru_cache(maxsize=4)
def _intermediate_value_upsert(dialect: str) -> Any:
    """INSERT ... SELECT ... WHERE the trial is running ... ON CONFLICT (trial_id, step) DO UPDATE ... RETURNING,
    built once (the row it returns says it was written: the drivers' rowcount of an INSERT ... SELECT varies)."""
    iv, t = optuna_trial_intermediate_values, optuna_trials
    row = select(bindparam("trial_id", type_=Integer), bindparam("step", type_=Integer),
                 bindparam("value", type_=iv.c.intermediate_value.type),
                 bindparam("value_type", type_=iv.c.intermediate_value_type.type)).where(
        exists().where(t.c.trial_id == bindparam("trial_id"), t.c.state == "RUNNING"))
    statement = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(iv).from_select(
        ["trial_id", "step", "intermediate_value", "intermediate_value_type"], row)
    return statement.on_conflict_do_update(
        index_elements=[iv.c.trial_id, iv.c.step],
        set_={"intermediate_value": statement.excluded.intermediate_value,
              "intermediate_value_type": statement.excluded.intermediate_value_type}).returning(iv.c.step)


@lru_cache(maxsize=8)
def _upsert(dialect: str, model: type[TrialMetric] | type[TrialDiagnosis]) -> Any:
    """INSERT ... ON CONFLICT for a per-epoch write, built once per process and executed with
    parameters: building the statement anew every epoch cost more than running it.

    Metrics: an epoch already stored is left as it is. Diagnoses: the trial's row is replaced.
    None for a database without ON CONFLICT.
    """
    if dialect not in ("sqlite", "postgresql"):
        return None
    statement = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(model)
    if model is TrialMetric:
        return statement.on_conflict_do_nothing(
            index_elements=[TrialMetric.study_id, TrialMetric.trial_number, TrialMetric.epoch])
    kept = ("id", "study_id", "trial_number")
    return statement.on_conflict_do_update(
        index_elements=[TrialDiagnosis.study_id, TrialDiagnosis.trial_number],
        set_={c.name: statement.excluded[c.name] for c in TrialDiagnosis.__table__.columns if c.name not in kept},
    )


def epochs_recorded(session: Session, study_id: int) -> dict[int, int]:
    """Epoch rows per trial number of one study."""
    rows = session.execute(
        select(TrialMetric.trial_number, func.count()).where(TrialMetric.study_id == study_id)
        .group_by(TrialMetric.trial_number)
    )
    return {number: n for number, n in rows}


# ---------------------------------------------------------------- diagnoses


def _json_safe(value: Any) -> Any:
    """JSON without NaN tokens (PostgreSQL refuses them): non-finite floats become the contract's strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def save_diagnosis(session: Session, study_id: int, trial_id: int, trial_number: int, epoch: int,
                   diagnosis: dict[str, Any], final: bool = False) -> None:
    """Insert or replace the trial's diagnosis (one row per trial: the latest one).

    `diagnosis` is `Diagnosis.to_dict()`; `epoch` is the last epoch it saw; `final` says the
    trial has ended. One statement on SQLite and PostgreSQL (INSERT ... ON CONFLICT DO UPDATE).
    """
    values: dict[str, Any] = dict(
        study_id=study_id, trial_number=trial_number, trial_id=trial_id, epoch=int(epoch),
        verdict=str(diagnosis["verdict"]), healthy=bool(diagnosis["healthy"]),
        confidence=float(diagnosis["confidence"]),
        onset_epoch=None if diagnosis.get("onset_epoch") is None else int(diagnosis["onset_epoch"]),
        final=bool(final), diagnosis=_json_safe(diagnosis), updated_at=utcnow(),
    )
    statement = _upsert(session.get_bind().dialect.name, TrialDiagnosis)
    if statement is not None:
        session.execute(statement, values)
        return
    row = get_diagnosis(session, study_id, trial_number)  # other databases: read, then write
    if row is None:
        session.add(TrialDiagnosis(**values))
    else:
        for name, value in values.items():
            setattr(row, name, value)


def mark_diagnosis_final(session: Session, study_id: int, trial_number: int) -> None:
    """The trial ended without its process saying so (it was killed): its latest diagnosis is its last."""
    session.execute(
        update(TrialDiagnosis)
        .where(TrialDiagnosis.study_id == study_id, TrialDiagnosis.trial_number == trial_number)
        .values(final=True, updated_at=utcnow()).execution_options(synchronize_session=False)
    )


def get_diagnosis(session: Session, study_id: int, trial_number: int) -> TrialDiagnosis | None:
    return session.scalar(select(TrialDiagnosis).where(TrialDiagnosis.study_id == study_id,
                                                       TrialDiagnosis.trial_number == trial_number))


def diagnoses_by_trial(session: Session, study_id: int, *, with_diagnosis: bool = True) -> dict[int, TrialDiagnosis]:
    """The latest diagnosis of each trial of one study that has one, by trial number.

    `with_diagnosis=False` leaves the JSON column unread (verdict, confidence and the other
    columns only): a trial list needs no findings. Reading it then raises instead of querying.
    """
    query = select(TrialDiagnosis).where(TrialDiagnosis.study_id == study_id)
    if not with_diagnosis:
        query = query.options(defer(TrialDiagnosis.diagnosis, raiseload=True))
    return {row.trial_number: row for row in session.scalars(query)}


# ---------------------------------------------------------------- trial pages (Optuna's tables, read-only)
#
# A trial list is built from Optuna's tables and Converge's with a few queries bounded by the
# page: the page's trial rows (filtered, ordered, limited; their value, latest verdict, rerun,
# repair and epoch count joined to them), then the params and user attributes of those trials
# only. Never a read of the whole study.


def get_study_and_optuna_id(session: Session, name: str) -> tuple[Study, int]:
    """The study and its Optuna study id, in one query; NotFound for an unknown study."""
    row = session.execute(
        select(Study, optuna_studies.c.study_id)
        .outerjoin(optuna_studies, optuna_studies.c.study_name == Study.name)
        .where(Study.name == name)
    ).first()
    if row is None:
        raise NotFound(f"no study named {name!r}")
    if row[1] is None:
        raise NotFound(f"study {name!r} has no Optuna study in this database")
    return row[0], row[1]


@dataclass(frozen=True)
class TrialQuery:
    """Which trials of one study: all of them, or those in an Optuna state, with a verdict, or of these numbers."""

    optuna_study_id: int
    study_id: int
    state: str | None = None  # Optuna's state name: RUNNING, WAITING, COMPLETE, PRUNED, FAIL
    verdict: str | None = None  # of the trial's latest diagnosis
    numbers: Sequence[int] | None = None


TrialSort = Literal["number", "objective"]


def _filtered(query: Any, q: TrialQuery) -> Any:
    t = optuna_trials
    query = query.where(t.c.study_id == q.optuna_study_id)
    if q.state is not None:
        query = query.where(t.c.state == q.state)
    if q.numbers is not None:
        query = query.where(t.c.number.in_(list(q.numbers)))
    if q.verdict is not None:
        d = aliased(TrialDiagnosis, name="wanted")
        query = query.join(d, and_(d.study_id == q.study_id, d.trial_number == t.c.number, d.verdict == q.verdict))
    return query


def objective_sort_key(direction: str) -> tuple[Any, Any]:
    """(rank, sort_value): ordering by them, then by number, lists the best trials first.

    Rank 0 is a complete trial at the best infinity, 1 a finite one (sort_value is its value,
    negated when maximizing so that ascending is always best first), 2 the worst infinity, 3
    every trial without a completed value (pruned, failed, running, waiting: a pruned trial's
    value is its last intermediate one, not comparable with a finished run's).
    """
    t, v = optuna_trials, optuna_trial_values
    complete = t.c.state == "COMPLETE"
    best, worst = ("INF_NEG", "INF_POS") if direction == "minimize" else ("INF_POS", "INF_NEG")
    finite = and_(complete, v.c.value_type == "FINITE")
    rank = case((and_(complete, v.c.value_type == best), 0), (finite, 1), (and_(complete, v.c.value_type == worst), 2),
                else_=3)
    sort_value = case((finite, v.c.value if direction == "minimize" else -v.c.value), else_=literal(0.0))
    return rank, sort_value


def trial_page_rows(session: Session, q: TrialQuery, *, sort: TrialSort = "number", direction: str = "minimize",
                    after: Sequence[Any] | None = None, limit: int | None = None, attrs: Sequence[str] = (),
                    total: bool = False, detail: bool = False) -> list[Row[Any]]:
    """One page of trials, in order: the trial row, its `value` and `value_type`, and per trial
    `verdict`, `confidence`, `retry_number`, `repair_number` and `epochs` (recorded); sorted by
    objective, also the sort key (`rank`, `sort_value`).

    In the same statement, when asked: `attr_0`, `attr_1`, ...: the stored JSON (`value_json`) of
    each of the user attributes `attrs`, null where the trial has none (one lookup each by
    `trial_user_attributes`' unique (trial_id, key)); `total` (`total=True`): how many trials match
    `q`, on every row (what `count_trials` says; with no row, ask it); `detail=True`: the latest
    diagnosis' JSON (`diagnosis`) and the sum of the trial's `epoch_seconds` (`train_seconds`).

    `after` is the last row's key of the page before: (number, trial_id) when sorting by number,
    (rank, sort_value, number, trial_id) when sorting by objective (the trial id breaks ties
    between the equal numbers two racing Optuna processes can give). Keyset pagination: a trial
    added meanwhile never shifts the trials after the key.

    The page is chosen first (by number: from `trials` alone; by objective: with each trial's
    value joined, which the order needs), limited, and only its rows are joined to the rest.
    """
    t, v = optuna_trials, optuna_trial_values
    value_join = and_(v.c.trial_id == t.c.trial_id, v.c.objective == 0)
    columns = (t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete)
    if sort == "number":
        inner = _filtered(select(*columns), q).order_by(t.c.number, t.c.trial_id)
        if after is not None:
            inner = inner.where(tuple_(t.c.number, t.c.trial_id) > tuple_(*(literal(k) for k in after)))
    else:
        rank, sort_value = objective_sort_key(direction)
        inner = _filtered(select(*columns, v.c.value, v.c.value_type, rank.label("rank"),
                                 sort_value.label("sort_value")).select_from(t.outerjoin(v, value_join)), q)
        if after is not None:
            inner = inner.where(tuple_(rank, sort_value, t.c.number, t.c.trial_id)
                                > tuple_(*(literal(k) for k in after)))
        inner = inner.order_by(rank, sort_value, t.c.number, t.c.trial_id)
    if limit is not None:
        inner = inner.limit(limit)
    page = inner.subquery("page")
    d, r, rp = TrialDiagnosis, TrialRetry, TrialRepair
    epochs = (select(func.count()).select_from(TrialMetric)
              .where(TrialMetric.study_id == q.study_id, TrialMetric.trial_number == page.c.number)
              .scalar_subquery())
    joined = (page.outerjoin(d, and_(d.study_id == q.study_id, d.trial_number == page.c.number))
              .outerjoin(r, and_(r.study_id == q.study_id, r.trial_number == page.c.number))
              .outerjoin(rp, and_(rp.study_id == q.study_id, rp.trial_number == page.c.number)))
    extra = [d.verdict, d.confidence, r.retry_number, rp.repair_number, epochs.label("epochs")]
    a = optuna_trial_user_attributes
    extra += [select(a.c.value_json).where(a.c.trial_id == page.c.trial_id, a.c.key == key).scalar_subquery()
              .label(f"attr_{i}") for i, key in enumerate(attrs)]
    if total:  # not correlated with the page: computed once
        extra.append(_filtered(select(func.count()).select_from(optuna_trials), q).correlate(None)
                     .scalar_subquery().label("total"))
    if detail:
        extra += [d.diagnosis, select(func.sum(TrialMetric.epoch_seconds))
                  .where(TrialMetric.study_id == q.study_id, TrialMetric.trial_number == page.c.number)
                  .scalar_subquery().label("train_seconds")]
    if sort == "number":  # the page's values: one lookup each by trial_values' unique (trial_id, objective)
        value_of = and_(v.c.trial_id == page.c.trial_id, v.c.objective == 0)
        query = (select(page, select(v.c.value).where(value_of).scalar_subquery().label("value"),
                        select(v.c.value_type).where(value_of).scalar_subquery().label("value_type"), *extra)
                 .select_from(joined).order_by(page.c.number, page.c.trial_id))
    else:
        query = (select(page, *extra).select_from(joined)
                 .order_by(page.c.rank, page.c.sort_value, page.c.number, page.c.trial_id))
    return session.execute(query).all()  # fetchall: one call, not one per row


def count_trials(session: Session, q: TrialQuery) -> int:
    """How many trials match `q` (a page's `total`)."""
    return session.scalar(_filtered(select(func.count()).select_from(optuna_trials), q)) or 0


def trial_params_rows(session: Session, trial_ids: Sequence[int]) -> list[Row[Any]]:
    """(trial_id, param_name, param_value, distribution_json) of these trials, in the order they were set."""
    if not trial_ids:
        return []
    p = optuna_trial_params
    return session.execute(
        select(p.c.trial_id, p.c.param_name, p.c.param_value, p.c.distribution_json)
        .where(p.c.trial_id.in_(list(trial_ids))).order_by(p.c.param_id)
    ).all()


@dataclass(frozen=True)
class TrialExtras:
    """What one trial's detail adds to its row, from three of Optuna's tables."""

    params: list[tuple[str, float, str]]  # (param_name, param_value, distribution_json), in the order they were set
    user_attrs: list[tuple[str, str]]  # (key, value_json), in the order they were set
    intermediate_values: list[tuple[int, float | None, str]]  # (step, value, value_type), by step


def trial_extras(session: Session, trial_id: int) -> TrialExtras:
    """One trial's params, user attributes and intermediate values in one statement: a UNION ALL of
    the three reads, each row shaped (kind, ord, name, number, text)."""
    p, a, i = optuna_trial_params, optuna_trial_user_attributes, optuna_trial_intermediate_values
    no_name, no_number = cast(null(), String), cast(null(), Float)
    union = union_all(
        select(literal(0).label("kind"), p.c.param_id.label("ord"), p.c.param_name.label("name"),
               p.c.param_value.label("number"), p.c.distribution_json.label("text")).where(p.c.trial_id == trial_id),
        select(literal(1), a.c.trial_user_attribute_id, a.c.key, no_number, a.c.value_json)
        .where(a.c.trial_id == trial_id),
        select(literal(2), i.c.step, no_name, i.c.intermediate_value, cast(i.c.intermediate_value_type, String))
        .where(i.c.trial_id == trial_id),
    )
    columns = union.selected_columns
    extras = TrialExtras([], [], [])
    for kind, ord_, name, number, text in session.execute(union.order_by(columns.kind, columns.ord)).all():
        if kind == 0:
            extras.params.append((name, number, text))
        elif kind == 1:
            extras.user_attrs.append((name, text))
        else:
            extras.intermediate_values.append((ord_, number, text))
    return extras


def study_param_names(session: Session, optuna_study_id: int) -> list[str]:
    """Every parameter name any trial of the study has (an export's columns)."""
    t, p = optuna_trials, optuna_trial_params
    return sorted(session.scalars(
        select(p.c.param_name).join(t, t.c.trial_id == p.c.trial_id)
        .where(t.c.study_id == optuna_study_id).distinct()
    ))


def retry_chain(session: Session, study_id: int, number: int, max_hops: int = 100, *, back: bool = True,
                forward: bool = True) -> list[int]:
    """The trial numbers of a line of attempts, first to latest, that `number` belongs to:
    each failed attempt links to its rerun in `converge_trial_retries`. Two recursive queries
    along the links (indexed both ways), at most `max_hops` each; `back=False` or `forward=False`
    leaves one out for a caller that knows no link leads that way."""
    r = TrialRetry

    def walk(key: Any, other: Any) -> list[int]:
        start = select(key.label("n"), literal(1).label("hop")).where(r.study_id == study_id, other == number)
        chain = start.cte("chain", recursive=True)
        step = (select(key, chain.c.hop + 1).select_from(r)
                .join(chain, and_(r.study_id == study_id, other == chain.c.n)).where(chain.c.hop < max_hops))
        chain = chain.union_all(step)
        return list(session.scalars(select(chain.c.n).order_by(chain.c.hop)))

    before = walk(r.trial_number, r.retry_number) if back else []  # the attempt each one reruns, going back
    after = walk(r.retry_number, r.trial_number) if forward else []  # the rerun of each one, going forward
    return [*reversed(before), number, *after]


def trial_metrics_with_param(session: Session, optuna_study_id: int, study_id: int, number: int,
                             param: str) -> tuple[Row[Any] | None, list[Row[Any]]]:
    """One trial with one of its params, and its epochs, in one statement: (the trial's `trial_id`,
    `param_value` and `distribution_json`, nulls when it has no such param; None for no such trial)
    and its epoch rows in order (`epoch` and each of METRIC_COLUMNS, NaN kept; the same rows also
    carry the trial's columns)."""
    t, p, m = optuna_trials, optuna_trial_params, TrialMetric
    trial = (select(t.c.trial_id, p.c.param_value, p.c.distribution_json)
             .select_from(t.outerjoin(p, and_(p.c.trial_id == t.c.trial_id, p.c.param_name == param)))
             .where(t.c.study_id == optuna_study_id, t.c.number == number).limit(1).subquery("trial"))
    rows = session.execute(
        select(trial, m.epoch, *(getattr(m, name) for name in METRIC_COLUMNS))
        .select_from(trial.outerjoin(m, and_(m.study_id == study_id, m.trial_number == number)))
        .order_by(m.epoch)
    ).all()
    if not rows:
        return None, []
    return rows[0], [row for row in rows if row.epoch is not None]  # a trial without epochs: one row of nulls


# ---------------------------------------------------------------- workers


def register_worker(session: Session, worker_id: str, host: str, pid: int, devices: str, slots: int) -> None:
    session.add(Worker(id=worker_id, host=host, pid=pid, devices=devices, slots=slots, state="running",
                       current_trials=[]))


def heartbeat_worker(session: Session, worker_id: str, current_trials: list[dict[str, Any]],
                     state: str = "running") -> None:
    session.execute(
        update(Worker).where(Worker.id == worker_id)
        .values(last_heartbeat=utcnow(), current_trials=current_trials, state=state)
        .execution_options(synchronize_session=False)
    )


def list_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.started_at)))


def trial_numbers(session: Session, trial_ids: list[int]) -> dict[int, int]:
    """Optuna trial id -> the trial's number within its study (what users see)."""
    if not trial_ids:
        return {}
    rows = session.execute(select(optuna_trials.c.trial_id, optuna_trials.c.number)
                           .where(optuna_trials.c.trial_id.in_(trial_ids)))
    return {row.trial_id: row.number for row in rows}


def prune_dead_workers(session: Session, older_than: timedelta) -> int:
    """Forget workers whose heartbeat stopped long ago (their trials fail by Optuna's heartbeat)."""
    cutoff: datetime = utcnow() - older_than
    result = session.execute(delete(Worker).where(Worker.last_heartbeat < cutoff))
    return result.rowcount or 0


# ---------------------------------------------------------------- the health probe


def probe_write(session: Session) -> None:
    """The health probe's write: `converge_health`'s one row rewritten (added again if it was deleted). The caller
    commits it; only a commit makes SQLite and PostgreSQL refuse it when read-only or out of space."""
    done = session.execute(update(HealthProbe).where(HealthProbe.id == 1)
                           .values(probes=HealthProbe.probes + 1, probed_at=utcnow())
                           .execution_options(synchronize_session=False))
    if not done.rowcount:
        session.add(HealthProbe(id=1, probes=1, probed_at=utcnow()))


# ---------------------------------------------------------------- API tokens (hashes only: see service.auth)


def add_api_token(session: Session, *, name: str | None, scope: str, token_hash: str, prefix: str) -> ApiToken:
    token = ApiToken(name=name, scope=scope, token_hash=token_hash, prefix=prefix)
    session.add(token)
    session.flush()
    return token


def list_api_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def find_api_token(session: Session, token_hash: str) -> ApiToken | None:
    """The token with this hash, revoked or not (one indexed lookup)."""
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))


def any_active_api_token(session: Session) -> bool:
    """Whether a token that is not revoked exists: authentication is on exactly then."""
    return session.scalar(select(ApiToken.id).where(ApiToken.revoked_at.is_(None)).limit(1)) is not None


def revoke_api_token(session: Session, token_id: int) -> tuple[ApiToken, bool]:
    """Revoke a token; returns it and whether it was active until now. NotFound for an unknown id."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"no API token with id {token_id} (`converge token list` shows them)")
    if token.revoked_at is not None:
        return token, False
    token.revoked_at = utcnow()
    session.flush()
    return token, True


def touch_api_token(session: Session, token_id: int, when: datetime) -> None:
    session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=when)
                    .execution_options(synchronize_session=False))


# ---------------------------------------------------------------- figures and /metrics


def metric_rows_of_trials(session: Session, study_id: int, numbers: Sequence[int],
                          columns: Sequence[str] = ("train_loss", "val_loss")) -> list[Row[Any]]:
    """The epoch rows (`trial_number`, `epoch` and `columns`, NaN kept) of some trials of one study, in order."""
    if not numbers:
        return []
    m = TrialMetric
    return list(session.execute(
        select(m.trial_number, m.epoch, *(getattr(m, c) for c in columns))
        .where(m.study_id == study_id, m.trial_number.in_(list(numbers))).order_by(m.trial_number, m.epoch)
    ).all())


def rerun_trial_numbers(session: Session, study_id: int) -> set[int]:
    """The failed attempts of one study that were rerun (their copies count instead)."""
    return set(session.scalars(select(TrialRetry.trial_number).where(TrialRetry.study_id == study_id)))


def optuna_trial_state(session: Session, trial_id: int) -> str | None:
    """Optuna's state name of one trial (RUNNING, COMPLETE, PRUNED, FAIL, WAITING), by its id."""
    return session.scalar(select(optuna_trials.c.state).where(optuna_trials.c.trial_id == trial_id))


def study_states(session: Session) -> Counter[str]:
    """Converge's studies per state."""
    return Counter({state: n for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state))})


def optuna_trial_states(session: Session) -> Counter[str]:
    """Optuna's trials per state, over every study of the database."""
    t = optuna_trials
    return Counter({str(state): n for state, n in session.execute(select(t.c.state, func.count()).group_by(t.c.state))})


def finished_trial_times(session: Session) -> list[tuple[datetime, datetime]]:
    """(start, end) of every trial that ended with both times recorded."""
    t = optuna_trials
    return [(start, end) for start, end in session.execute(
        select(t.c.datetime_start, t.c.datetime_complete)
        .where(t.c.state.in_(FINISHED_TRIAL_STATES), t.c.datetime_start.is_not(None),
               t.c.datetime_complete.is_not(None)))]


def epoch_seconds_histogram(session: Session, bounds: Sequence[float]) -> tuple[list[int], int, float]:
    """Epoch durations as a cumulative histogram, in one aggregate: (count at or under each bound, count, sum)."""
    s = TrialMetric.epoch_seconds
    finite_s = and_(s.is_not(None), s >= 0, s < 1e300)  # NaN compares false on PostgreSQL's ordering too
    row = session.execute(select(
        *(func.coalesce(func.sum(case((and_(finite_s, s <= b), 1), else_=0)), 0) for b in bounds),
        func.coalesce(func.sum(case((finite_s, 1), else_=0)), 0),
        func.coalesce(func.sum(case((finite_s, s), else_=0.0)), 0.0),
    )).one()
    return [int(v) for v in row[:len(bounds)]], int(row[len(bounds)]), float(row[len(bounds) + 1])


def study_system_attrs(session: Session, optuna_study_id: int, keys: Sequence[str]) -> dict[str, Any]:
    """These keys' values among a study's system attributes (those present): one indexed lookup,
    where Optuna's `get_study_system_attrs` reads them all (they grow with the study: a dashboard
    note per trial)."""
    table = optuna_study_system_attributes
    rows = session.execute(select(table.c.key, table.c.value_json)
                           .where(table.c.study_id == optuna_study_id, table.c.key.in_(list(keys))))
    return {key: json.loads(value) for key, value in rows}


def set_study_system_attrs(session: Session, optuna_study_id: int, values: dict[str, Any]) -> None:
    """Write these study system attributes in one statement, stored as Optuna stores them (JSON in
    `value_json`, unique per study and key): Optuna's `set_study_system_attr` is a transaction of
    several queries per attribute."""
    if not values:
        return
    table = optuna_study_system_attributes
    dialect = session.get_bind().dialect.name
    statement = (sqlite_insert if dialect == "sqlite" else postgresql_insert)(table)
    statement = statement.on_conflict_do_update(index_elements=[table.c.study_id, table.c.key],
                                                set_={"value_json": statement.excluded.value_json})
    session.execute(statement, [{"study_id": optuna_study_id, "key": key, "value_json": json.dumps(value)}
                                for key, value in values.items()])
