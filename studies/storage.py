"""Optuna's RDB storage over Converge's database, opened the way every process must open it.

Tables are never created here (`converge db upgrade` does that), heartbeats are on so a
trial whose process died is failed after the grace period, and rerun (`studies.retries`).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import time
import warnings
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial, wraps
from typing import Any

import optuna
import sqlalchemy as sa
from optuna import distributions
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError

from converge.core.db.engine import (
    describe_cause,
    engine_kwargs,
    get_engine,
    is_transient,
    reconnect_after_refused_writes,
    retry_transient,
    translate_db_error,
)
from converge.core.db.migrate import check_schema
from converge.core.errors import NotFound
from converge.core.settings import Settings
from converge.studies.retries import rerun_stale_trial

log = logging.getLogger("converge.storage")

# The RDBStorage calls a running trial makes (sampling, report, should_prune, the final tell,
# user attributes) and the worker's reads, all safe to repeat: the storage's own internals
# that Optuna's `_CachedStorage` calls are listed, not the public wrappers around them.
# A study's submission (create_new_study, set_study_user_attr, delete_study) is not retried:
# the API and CLI answer at once that the database is unavailable.
PATIENT_CALLS = (
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "get_trial", "_get_trials", "get_trial_id_from_study_id_trial_number",
    "get_trial_param", "get_trial_user_attrs", "get_trial_system_attrs", "_get_best_trial_id", "_get_stale_trial_ids",
    "_create_new_trial", "_set_trial_param", "set_trial_intermediate_value", "set_trial_state_values",
    "set_trial_user_attr", "set_trial_system_attr", "set_trial_params", "has_waiting_trials",
)


@dataclass(frozen=True)
class PendingParam:
    """A suggested parameter not yet written: the arguments of RDBStorage's `_set_trial_param`."""

    trial_id: int
    name: str
    value_internal: float
    distribution: BaseDistribution
    previous_distribution: BaseDistribution | None


class PatientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, waiting out a database restart or a SQLite lock instead of failing trials.

    Optuna 5 turns any driver error inside a storage call into StorageInternalError and retries
    only trial creation: a failed `report`/`should_prune` fails the trial, a failed final `tell`
    leaves it RUNNING, and one failed heartbeat ends the trial's heartbeat thread, so the trial
    is failed as stale a grace period later while it still trains. Here the calls in
    `PATIENT_CALLS` are retried on transient errors (`core.db.engine.retry_transient`), and a
    heartbeat that fails is logged and skipped: the next one follows `heartbeat_interval` later,
    and only a silence longer than the grace period fails the trial. (A final `tell` whose commit
    went through but whose reply was lost raises UpdateFinishedTrialError on its retry.)
    """

    def set_trial_params(self, params: list[PendingParam], system_attrs: dict[tuple[int, str], Any] | None = None,
                         user_attrs: dict[tuple[int, str], Any] | None = None) -> None:
        """Write one trial's suggested parameters, and the attributes set while they were suggested
        (TPE's constant-liar record, the slot's pid), in one transaction (see
        `ThrottledReads.params_in_one_write`): what `_set_trial_param_without_commit` and
        `_set_trial_attr_without_commit` do for each, with the trial looked up and checked once
        rather than once a write. Attributes are keyed by (trial id, key)."""
        attrs_of = {models.TrialSystemAttributeModel: system_attrs or {},
                    models.TrialUserAttributeModel: user_attrs or {}}
        trial_ids = {p.trial_id for p in params} | {trial_id for attrs in attrs_of.values() for trial_id, _ in attrs}
        if len(trial_ids) != 1:
            raise ValueError("set_trial_params writes to exactly one trial")
        with _create_scoped_session(self.scoped_session, True) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_ids.pop(), session)
            self.check_trial_is_updatable(trial.trial_id, trial.state)
            rows = []
            for p in params:
                previous = p.previous_distribution or self._stored_distribution(session, trial.study_id, p.name)
                if previous is not None:
                    check_distribution_compatibility(previous, p.distribution)
                rows.append({"trial_id": trial.trial_id, "param_name": p.name, "param_value": p.value_internal,
                             "distribution_json": distributions.distribution_to_json(p.distribution)})
            if rows:  # Core, not the ORM's unit of work: one executemany, nothing tracked
                session.execute(sa.insert(models.TrialParamModel.__table__), rows)
            for model, attrs in attrs_of.items():
                self._set_trial_attrs(session, model, trial.trial_id, {key: value for (_, key), value in attrs.items()})

    def _set_trial_attrs(self, session: Any, model: Any, trial_id: int, attrs: dict[str, Any]) -> None:
        """Optuna's attribute upsert (`_set_trial_attr_without_commit`), for all of them in one statement."""
        if not attrs:
            return
        if self.engine.name not in ("sqlite", "postgresql"):
            for key, value in attrs.items():
                self._set_trial_attr_without_commit(session, model, trial_id, key, value)
            return
        table = model.__table__
        insert = (sqlite_insert if self.engine.name == "sqlite" else postgresql_insert)(table)
        session.execute(insert.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key],
                                                     set_={"value_json": insert.excluded.value_json}),
                        [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                         for key, value in attrs.items()])

    @staticmethod
    def _stored_distribution(session: Any, study_id: int, name: str) -> BaseDistribution | None:
        """The distribution another trial of the study stored for parameter `name`, if any."""
        record = (session.query(models.TrialParamModel).join(models.TrialModel)
                  .filter(models.TrialModel.study_id == study_id, models.TrialParamModel.param_name == name)
                  .first())
        return None if record is None else distributions.json_to_distribution(record.distribution_json)

    def has_waiting_trials(self, study_id: int) -> bool:
        """Whether the study has a trial queued to run (a rerun, a repair, an enqueued one): one
        indexed query, where reading the queued trials themselves takes six."""
        with _create_scoped_session(self.scoped_session) as session:
            return session.query(models.TrialModel.trial_id).filter(
                models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.WAITING,
            ).first() is not None

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except optuna.exceptions.StorageInternalError as exc:
            if not is_transient(exc):
                raise
            log.warning("trial id %d: heartbeat missed: %s", trial_id, describe_cause(exc))


def _patient(name: str) -> Callable[..., Any]:
    method = getattr(PatientRDBStorage, name)  # its own, or the RDBStorage method it inherits

    @wraps(method)
    def call(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry_transient(partial(method, self, *args, **kwargs), what=f"Optuna storage {name}")

    return call


for _name in PATIENT_CALLS:
    setattr(PatientRDBStorage, _name, _patient(_name))


class ThrottledReads(_CachedStorage):
    """Optuna's per-study trial cache (what `load_study` wraps an RDBStorage in), refreshed from
    the database at most every `max_age_s` seconds.

    A trial reads its study's new and unfinished trials up to five times: the waiting-trial check
    at ask, TPE's search space, TPE's constant-liar sample, the pruner at every epoch. Each read
    is six queries over every unfinished trial: most of what a short trial costs outside its fit.
    Here a read within `max_age_s` of the last one reuses it, except the waiting-trial check at
    ask, which always asks the database (one query: are any queued?) and reads when one is: a
    rerun or repair queued as WAITING must never be missed. What a
    reused read can miss, a trial another worker started or finished within the last second,
    shifts a sampling or pruning decision as if that trial had come a second later.
    """

    def __init__(self, backend: optuna.storages.RDBStorage, max_age_s: float = 1.0):
        super().__init__(backend)
        self.max_age_s = max_age_s
        self._read_at: dict[int, float] = {}
        self._stale_checked_at: dict[int, float] = {}
        self._pending_params: list[PendingParam] | None = None
        self._pending_system_attrs: dict[tuple[int, str], Any] = {}
        self._pending_user_attrs: dict[tuple[int, str], Any] = {}
        self._running: dict[int, FrozenTrial] = {}  # see `get_trial`
        self._claimed: set[int] = set()  # waiting trials this process set running, not read yet
        self._stored_by_caller: dict[tuple[int, int], float] = {}  # see `intermediate_value_stored`

    # ------------------------------------------------------------ the trials this process runs

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        with self._lock:
            _, number = self._trial_id_to_study_id_and_number[trial_id]
            created = self._studies[study_id].trials[number]
            if created.state == TrialState.RUNNING:  # not a queued copy (an enqueued trial, a rerun)
                self._running[trial_id] = copy.deepcopy(created)
        return trial_id

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """A trial this process created or claimed and still runs, from the copy it keeps.

        Optuna's `Trial` reads its new trial back and the final `tell` reads it again, six queries
        each. The trial's creation (or, for a queued trial, the first read after this process set
        it running) returned it, and every write to it goes through this storage, which applies
        it to the copy: its params, intermediate values and attributes are the stored ones. Its
        state is this process's to change; should another process have failed it meanwhile (a
        stale heartbeat), the final state write finds it finished and refuses, as Optuna's
        storage does for any write to a finished trial.
        """
        with self._lock:
            running = self._running.get(trial_id)
            if running is not None:
                return copy.deepcopy(running)
            claimed = trial_id in self._claimed
        trial = super().get_trial(trial_id)
        if claimed and trial.state == TrialState.RUNNING:
            with self._lock:
                self._claimed.discard(trial_id)
                self._running[trial_id] = copy.deepcopy(trial)
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        with self._lock:
            running = self._running.pop(trial_id, None)
            self._claimed.discard(trial_id)
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:  # `ask` took a queued trial: its first read is kept
            with self._lock:
                self._claimed.add(trial_id)
        elif changed and running is not None and state.is_finished():
            self._show_ended(running, state, values)
        return changed

    def _show_ended(self, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        """This process's trial, just ended, shown in the study's cached trials at once.

        Otherwise the next trial's pruning rules and sampler would not see it until the next read
        (`max_age_s`): a trial of a fast task, in a sequential sweep, would not count as its
        successor's peer. The cache still counts the trial as unfinished, so that next read
        replaces this copy with the stored row.
        """
        trial.state = state
        trial.values = None if values is None else list(values)
        trial.datetime_complete = datetime.datetime.now()
        with self._lock:
            study_id, number = self._trial_id_to_study_id_and_number[trial._trial_id]
            study = self._studies.get(study_id)
            if study is not None and number in study.trials:
                study.trials[number] = trial

    def _apply(self, trial_id: int, write: Callable[[FrozenTrial], None]) -> None:
        """A write to a trial this process runs, applied to its copy too."""
        with self._lock:
            running = self._running.get(trial_id)
            if running is not None:
                write(running)

    # ------------------------------------------------------------ writes

    @contextmanager
    def params_in_one_write(self) -> Iterator[None]:
        """Within the block, suggested parameters, and the attributes set meanwhile (TPE's
        constant-liar record, the slot's pid), are kept and written together at its end, in one
        transaction: a trial's five suggestions and two attributes cost one round trip instead of
        seven. (Optuna's `Trial` keeps its own copy of its params and attributes, and this
        storage its copy of the trial, so nothing reads them back in between.)"""
        self._pending_params, self._pending_system_attrs, self._pending_user_attrs = [], {}, {}
        try:
            yield
        finally:
            pending, self._pending_params = self._pending_params, None
            system_attrs, self._pending_system_attrs = self._pending_system_attrs, {}
            user_attrs, self._pending_user_attrs = self._pending_user_attrs, {}
            if pending or system_attrs or user_attrs:
                self._backend.set_trial_params(pending, system_attrs, user_attrs)

    def _batching(self) -> bool:
        return self._pending_params is not None and isinstance(self._backend, PatientRDBStorage)

    def intermediate_value_stored(self, trial_id: int, step: int, value: float) -> None:
        """The caller has stored this intermediate value itself, in the transaction that stored the
        epoch's metrics (`repo.record_intermediate_value`): the `report` that follows updates the
        trial's copies and writes nothing."""
        self._stored_by_caller[(trial_id, step)] = value

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        if self._stored_by_caller.pop((trial_id, step), None) != intermediate_value:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._apply(trial_id, lambda t: t.intermediate_values.__setitem__(step, intermediate_value))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if self._batching():
            self._pending_user_attrs[(trial_id, key)] = value
        else:
            super().set_trial_user_attr(trial_id, key, value)
        self._apply(trial_id, lambda t: t.user_attrs.__setitem__(key, _as_stored(value)))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if self._batching():
            self._pending_system_attrs[(trial_id, key)] = value
        else:
            super().set_trial_system_attr(trial_id, key, value)
        self._apply(trial_id, lambda t: t.system_attrs.__setitem__(key, _as_stored(value)))

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        def record(trial: FrozenTrial) -> None:
            trial.distributions[param_name] = distribution
            trial.params[param_name] = distribution.to_external_repr(param_value_internal)

        if not self._batching():
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
            self._apply(trial_id, record)
            return
        with self._lock:  # what `_CachedStorage.set_trial_param` does, less the write
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            known = self._studies[study_id].param_distribution
            previous = known.get(param_name)
            if previous is not None:  # refused at the suggest call, as the write would refuse it
                check_distribution_compatibility(previous, distribution)
            else:
                known[param_name] = distribution
            self._pending_params.append(PendingParam(trial_id, param_name, param_value_internal, distribution,
                                                     previous))
        self._apply(trial_id, record)

    # ------------------------------------------------------------ reads of the whole study

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if states == (TrialState.WAITING,):  # Study.ask looking for a queued trial to run
            if isinstance(self._backend, PatientRDBStorage) and not self._backend.has_waiting_trials(study_id):
                return []
            self._read_at.pop(study_id, None)  # one is queued: read it now, however recent the last read
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna looks for stale trials before every trial; a trial is stale only after the grace
        period (60 s by default) without a heartbeat, so looking once a heartbeat interval per
        process finds it at most that much later, for one query instead of one a trial."""
        now = time.monotonic()
        interval = self._backend.get_heartbeat_interval() or 0
        if now - self._stale_checked_at.get(study_id, -float("inf")) < interval:
            return []
        self._stale_checked_at[study_id] = now
        return super()._get_stale_trial_ids(study_id)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        now = time.monotonic()
        if now - self._read_at.get(study_id, -float("inf")) < self.max_age_s:
            return
        super()._read_trials_from_remote_storage(study_id)
        self._read_at[study_id] = now


def _as_stored(value: Any) -> Any:
    """An attribute's value as a read gives it back (Optuna stores attributes as JSON)."""
    return json.loads(json.dumps(value))


@lru_cache(maxsize=8)
def open_storage(url: str, heartbeat_interval_s: int, grace_period_s: int,
                 busy_timeout_s: float = 30.0, patient: bool = True) -> optuna.storages.RDBStorage:
    """Open once per process; raises DatabaseUnavailable or SchemaNotReady in one line, at once
    (the CLI and the API must say so, not wait).

    `patient`: a `PatientRDBStorage`, for trials and workers; without it, for readers that
    must answer at once (the dashboard), Optuna's own.
    """
    check_schema(url)  # Optuna's own errors here would be a StorageInternalError traceback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage_class = PatientRDBStorage if patient else optuna.storages.RDBStorage
            storage = storage_class(
                url,
                engine_kwargs=engine_kwargs(url, busy_timeout_s),
                skip_table_creation=True,
                heartbeat_interval=heartbeat_interval_s,
                grace_period=grace_period_s,
                heartbeat_stale_trial_callback=partial(rerun_stale_trial, get_engine(url, busy_timeout_s)),
            )
        except OperationalError as exc:
            raise translate_db_error(exc, url) from None
    reconnect_after_refused_writes(storage.engine)  # a read-only or full database made writable again is used again
    return storage


def optuna_study_id(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The Optuna study id of a Converge study; NotFound if Optuna has no study of that name."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        raise NotFound(f"study {name!r} has no Optuna study in this database") from None


def trial_by_number(storage: optuna.storages.BaseStorage, name: str, number: int) -> FrozenTrial:
    """One trial of a study by its number, in one lookup (not a read of the whole study); NotFound if none."""
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(optuna_study_id(storage, name), number)
    except KeyError:
        raise NotFound(f"study {name!r} has no trial {number}") from None
    return storage.get_trial(trial_id)


def storage_for(settings: Settings, *, patient: bool = True) -> optuna.storages.RDBStorage:
    return open_storage(settings.database_url, settings.heartbeat_interval_s, settings.grace_period_s,
                        settings.sqlite_busy_timeout_s, patient)
