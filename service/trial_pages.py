"""Trial read models that stay cheap on a study of any size.

A study's trials a page at a time (keyset pagination with an opaque cursor), one trial's
detail with its line of attempts, a trial's metrics as columns, as a history or as CSV, and a
whole study's export streamed a page at a time. Everything is read from Optuna's tables and
Converge's with a few queries bounded by the page (`repo.trial_page_rows` and the queries
after it), never through a read of the whole study.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from optuna.distributions import BaseDistribution, json_to_distribution
from sqlalchemy import Row
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.core.db.engine import session_scope
from converge.core.db.models import METRIC_COLUMNS, Study
from converge.core.errors import InvalidRequest, NotFound
from converge.service.schemas import (
    AttemptOut,
    DiagnosisOut,
    MetricColumns,
    MetricsColumnsOut,
    MetricsOut,
    ObjectiveOut,
    StudyOut,
    TrialDetail,
    TrialOut,
    TrialPage,
)
from converge.studies.pruning import PRUNED_BY_ATTR
from converge.studies.repair import REPAIR_OF_ATTR
from converge.studies.retries import RETRY_OF_ATTR

# Optuna's state names and the API's.
API_STATE = {"RUNNING": "running", "WAITING": "waiting", "COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
OPTUNA_STATE = {api: optuna for optuna, api in API_STATE.items()}
SORTS = ("number", "objective")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
EXPORT_PAGE = 1000  # trials per query of an export or a full list
# Optuna's trial numbers and ids are INTEGER columns (32 bits on PostgreSQL): a larger number in a path or a
# cursor can match no trial, and binding it fails (PostgreSQL: integer out of range; SQLite past 64 bits).
MAX_TRIAL_NUMBER = 2**31 - 1
LIST_ATTRS = ("error", RETRY_OF_ATTR, PRUNED_BY_ATTR, REPAIR_OF_ATTR)  # the user attributes a TrialOut shows


# ---------------------------------------------------------------- rows into TrialOut


@lru_cache(maxsize=4096)
def _distribution(distribution_json: str) -> BaseDistribution:
    """A parsed distribution, cached by its JSON: a study's trials share a handful of them."""
    return json_to_distribution(distribution_json)


def external_param(param_value: float, distribution_json: str) -> Any:
    """A stored parameter as the user sees it (a categorical's choice rather than its index)."""
    return _distribution(distribution_json).to_external_repr(param_value)


def _utc(value: datetime | None) -> datetime | None:
    """Optuna stores naive local times (`datetime.now()`); the API speaks UTC with an offset."""
    return value.astimezone(timezone.utc) if value is not None else None


_INFINITIES = {"INF_POS": math.inf, "INF_NEG": -math.inf, "NAN": math.nan}


def _value(value: float | None, value_type: str | None) -> float | None:
    if value_type is None:
        return None
    return _INFINITIES[value_type] if value_type in _INFINITIES else value


def _params_by_trial(rows: Iterable[Row[Any]]) -> dict[int, dict[str, Any]]:
    params: dict[int, dict[str, Any]] = {}
    for trial_id, name, value, distribution_json in rows:  # (trial_params_rows' columns: unpacked, not looked up)
        params.setdefault(trial_id, {})[name] = external_param(value, distribution_json)
    return params


_ATTR_COLUMNS = tuple(f"attr_{i}" for i in range(len(LIST_ATTRS)))


def _list_attrs(row: Row[Any]) -> dict[str, Any]:
    """The LIST_ATTRS a row of `repo.trial_page_rows(..., attrs=LIST_ATTRS)` carries, parsed; unset ones left out."""
    return {key: json.loads(stored) for key, column in zip(LIST_ATTRS, _ATTR_COLUMNS)
            if (stored := getattr(row, column)) is not None}


def _fields(row: Row[Any], params: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    start, complete = _utc(row.datetime_start), _utc(row.datetime_complete)
    return dict(
        number=row.number, state=API_STATE[row.state], params=params, value=_value(row.value, row.value_type),
        datetime_start=start, datetime_complete=complete,
        duration_s=(complete - start).total_seconds() if start is not None and complete is not None else None,
        epochs_recorded=row.epochs, error=attrs.get("error"), verdict=row.verdict, confidence=row.confidence,
        retry_of=attrs.get(RETRY_OF_ATTR), rerun_as=row.retry_number, pruned_by=attrs.get(PRUNED_BY_ATTR),
        repair_of=attrs.get(REPAIR_OF_ATTR), repaired_as=row.repair_number,
    )


def trial_outs(session: Session, rows: Sequence[Row[Any]]) -> list[TrialOut]:
    """The page's rows (read with `attrs=LIST_ATTRS`) as TrialOut: one more query, for these trials' params."""
    params = _params_by_trial(repo.trial_params_rows(session, [row.trial_id for row in rows]))
    return [TrialOut(**_fields(row, params.get(row.trial_id, {}), _list_attrs(row))) for row in rows]


# ---------------------------------------------------------------- the cursor


def _describe(where: dict[str, Any]) -> str:
    return (f"study {where['study']!r}, sort={where['sort']}, state={where['state'] or 'any'}, "
            f"verdict={where['verdict'] or 'any'}")


def encode_cursor(where: dict[str, Any], key: Sequence[Any]) -> str:
    """Opaque to clients: urlsafe base64 of a small JSON with the sort, the filters and the last row's key."""
    text = json.dumps({**where, "after": list(key)}, separators=(",", ":"), allow_nan=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, where: dict[str, Any]) -> list[Any]:
    """The last row's key of the page before; InvalidRequest for a cursor this API did not issue, or one
    issued for another study, sort or filters."""
    invalid = InvalidRequest("cursor is not valid: pass the `next_cursor` of the previous page as it is, or leave "
                             "`cursor` out for the first page")
    try:
        payload = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise invalid from None
    if not isinstance(payload, dict) or set(payload) != {*where, "after"}:
        raise invalid
    issued = {k: payload[k] for k in where}
    if issued != where:
        raise InvalidRequest(f"this cursor was issued for {_describe(issued)}, but this request asks for "
                             f"{_describe(where)}: keep the same sort and filters on every page, or leave `cursor` "
                             "out to start again")
    key = payload["after"]
    if not isinstance(key, list) or len(key) != (2 if where["sort"] == "number" else 4):
        raise invalid
    ints, floats = (key, []) if where["sort"] == "number" else ([key[0], key[2], key[3]], [key[1]])
    if not all(isinstance(k, int) and not isinstance(k, bool) and abs(k) <= MAX_TRIAL_NUMBER for k in ints):
        raise invalid
    if not all(isinstance(k, int | float) and not isinstance(k, bool) and _finite_float(k) for k in floats):
        raise invalid
    if floats:
        key[1] = float(key[1])  # the sort value binds as a float (an integer past 64 bits would not bind at all)
    return key


def _finite_float(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _key(row: Row[Any], sort: str) -> list[Any]:
    """The row's keyset key: (number, trial_id), or (rank, sort_value, number, trial_id) by objective."""
    if sort == "number":
        return [row.number, row.trial_id]
    return [int(row.rank), float(row.sort_value), row.number, row.trial_id]


# ---------------------------------------------------------------- pages and full lists


def _study(session: Session, name: str) -> tuple[Study, int]:
    return repo.get_study_and_optuna_id(session, name)


def trial_page(session: Session, name: str, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None,
               state: str | None = None, verdict: str | None = None, sort: str = "number") -> TrialPage:
    """One page of the study's trials, matching `state` (API name) and `verdict`, by number or best objective first.

    Three queries: the study; the page's rows (limit + 1, to know whether a page follows) with
    their user attributes and the total; the page's params (a page with no row counts apart).
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if sort not in SORTS:
        raise InvalidRequest(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    study, optuna_id = _study(session, name)
    where = {"study": name, "sort": sort, "state": state, "verdict": verdict}
    after = decode_cursor(cursor, where) if cursor is not None else None
    query = repo.TrialQuery(optuna_id, study.id, state=OPTUNA_STATE[state] if state else None, verdict=verdict)
    rows = repo.trial_page_rows(session, query, sort=sort, direction=study.spec["objective"]["direction"],
                                after=after, limit=limit + 1, attrs=LIST_ATTRS, total=True)
    more, rows = len(rows) > limit, rows[:limit]
    total = rows[0].total if rows else repo.count_trials(session, query)
    return TrialPage(trials=trial_outs(session, rows), total=total,
                     next_cursor=encode_cursor(where, _key(rows[-1], sort)) if more else None)


def iter_trial_pages(session: Session, name: str, verdict: str | None = None,
                     page_size: int | None = None) -> Iterator[list[TrialOut]]:
    """Every trial of the study by number, a page of `page_size` (EXPORT_PAGE) at a time (keyset on number)."""
    study, optuna_id = _study(session, name)
    return _pages(session, repo.TrialQuery(optuna_id, study.id, verdict=verdict), page_size or EXPORT_PAGE)


def _pages(session: Session, query: repo.TrialQuery, page_size: int) -> Iterator[list[TrialOut]]:
    after: list[int] | None = None
    while True:
        rows = repo.trial_page_rows(session, query, after=after, limit=page_size, attrs=LIST_ATTRS)
        if rows:
            yield trial_outs(session, rows)
        if len(rows) < page_size:
            return
        after = _key(rows[-1], "number")


def list_trial_outs(session: Session, name: str, verdict: str | None = None) -> list[TrialOut]:
    """Every trial of the study in order (the CLI and the study diagnosis need them all)."""
    return [trial for page in iter_trial_pages(session, name, verdict) for trial in page]


# ---------------------------------------------------------------- one trial


_ATTEMPT_FIELDS = tuple(AttemptOut.model_fields)


def _attempt(fields: dict[str, Any]) -> AttemptOut:
    """An attempt from a trial's `_fields`."""
    return AttemptOut(**{key: fields[key] for key in _ATTEMPT_FIELDS})


def trial_detail(session: Session, name: str, number: int) -> TrialDetail:
    """One trial with its intermediate values, user attributes, latest diagnosis, attempts and training time.

    Three queries: the study; the trial's row with its latest diagnosis and training time; its
    params, user attributes and intermediate values (`repo.trial_extras`). Only a trial that reruns
    another or was rerun reads its line of attempts (`repo.retry_chain`) and their rows.
    """
    study, optuna_id = _study(session, name)
    rows = repo.trial_page_rows(session, repo.TrialQuery(optuna_id, study.id, numbers=[number]), detail=True)
    if not rows:
        raise NotFound(f"study {name!r} has no trial {number}")
    row = rows[0]
    extras = repo.trial_extras(session, row.trial_id)
    params = {param: external_param(value, distribution) for param, value, distribution in extras.params}
    attrs = {key: json.loads(stored) for key, stored in extras.user_attrs}
    fields = _fields(row, params, attrs)
    # Links to this trial's line of attempts: a rerun is made with RETRY_OF_ATTR set before its link to the
    # attempt it reruns is recorded (`studies.retries.rerun`), and the row's `retry_number` is this trial's
    # own rerun; with neither, no link leads to or from it.
    back, forward = RETRY_OF_ATTR in attrs, row.retry_number is not None
    chain = repo.retry_chain(session, study.id, number, back=back, forward=forward) if back or forward else [number]
    if chain == [number]:
        attempts = [_attempt(fields)]
    else:
        others = repo.trial_page_rows(session, repo.TrialQuery(optuna_id, study.id, numbers=chain), attrs=LIST_ATTRS)
        by_number = {other.number: _attempt(_fields(other, {}, _list_attrs(other))) for other in others}
        attempts = [by_number[n] for n in chain if n in by_number]
    intermediate = {step: _value(value, value_type) for step, value, value_type in extras.intermediate_values}
    return TrialDetail(**fields, intermediate_values=intermediate, user_attrs=attrs,
                       diagnosis=DiagnosisOut.model_validate(row.diagnosis) if row.diagnosis is not None else None,
                       attempts=attempts, train_seconds=None if row.train_seconds is None else float(row.train_seconds))


# ---------------------------------------------------------------- metrics


METRICS_CSV_COLUMNS = ("epoch", *METRIC_COLUMNS)


def _metrics(session: Session, name: str, number: int) -> tuple[ObjectiveOut, int, list[Row[Any]]]:
    """Two queries: the study, then the trial with its `epochs` param and its metric rows."""
    study, optuna_id = _study(session, name)
    trial, rows = repo.trial_metrics_with_param(session, optuna_id, study.id, number, "epochs")
    if trial is None:
        raise NotFound(f"study {name!r} has no trial {number}")
    max_epochs = (int(external_param(trial.param_value, trial.distribution_json)) if trial.param_value is not None
                  else len(rows))
    return ObjectiveOut(**study.spec["objective"]), max_epochs, rows


def metrics_columns(session: Session, name: str, number: int) -> MetricsColumnsOut:
    objective, max_epochs, rows = _metrics(session, name, number)
    columns = {column: [getattr(r, column) for r in rows] for column in METRICS_CSV_COLUMNS}
    return MetricsColumnsOut(study=name, trial=number, objective=objective, max_epochs=max_epochs,
                             columns=MetricColumns(**columns))


def metrics_history(session: Session, name: str, number: int) -> MetricsOut:
    objective, max_epochs, rows = _metrics(session, name, number)
    return MetricsOut(study=name, trial=number, objective=objective, max_epochs=max_epochs,
                      epochs=[{column: getattr(r, column) for column in METRICS_CSV_COLUMNS} for r in rows])


def metrics_csv(session: Session, name: str, number: int) -> str:
    _, _, rows = _metrics(session, name, number)
    return csv_text([METRICS_CSV_COLUMNS, *([csv_cell(getattr(r, c)) for c in METRICS_CSV_COLUMNS] for r in rows)])


# ---------------------------------------------------------------- CSV


def csv_cell(value: Any) -> str:
    """A CSV cell: empty for null, non-finite floats as in the JSON ("NaN", "Infinity", "-Infinity")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def csv_text(rows: Iterable[Sequence[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------- export

EXPORT_COLUMNS_BEFORE = ("number", "state", "value")
EXPORT_COLUMNS_AFTER = ("datetime_start", "datetime_complete", "duration_s", "epochs_recorded", "verdict",
                        "confidence", "retry_of", "rerun_as", "repair_of", "repaired_as", "pruned_by", "error")


def export_json(engine: Engine, name: str, study: StudyOut) -> Iterator[str]:
    """`{"study": ..., "trials": [...]}`, written a page of trials at a time."""
    yield '{"study":' + study.model_dump_json() + ',"trials":['
    first = True
    with session_scope(engine) as session:
        for page in iter_trial_pages(session, name):
            chunk = ",".join(t.model_dump_json() for t in page)
            yield chunk if first else "," + chunk
            first = False
    yield "]}"


def export_csv_header(param_names: Sequence[str]) -> list[str]:
    return [*EXPORT_COLUMNS_BEFORE, *(f"params_{p}" for p in param_names), *EXPORT_COLUMNS_AFTER]


def export_csv_row(trial: TrialOut, param_names: Sequence[str]) -> list[str]:
    """One trial as CSV cells: the JSON export's values (datetimes as there), a pruned trial's rule."""
    data = trial.model_dump(mode="json")
    data["pruned_by"] = (data["pruned_by"] or {}).get("rule")
    return [*(csv_cell(data[c]) for c in EXPORT_COLUMNS_BEFORE),
            *(csv_cell(data["params"].get(p)) for p in param_names),
            *(csv_cell(data[c]) for c in EXPORT_COLUMNS_AFTER)]


def export_csv(engine: Engine, name: str) -> Iterator[str]:
    """One row per trial, a page of trials at a time; one `params_NAME` column per parameter of the study."""
    with session_scope(engine) as session:
        study, optuna_id = _study(session, name)
        param_names = repo.study_param_names(session, optuna_id)
        yield csv_text([export_csv_header(param_names)])
        for page in _pages(session, repo.TrialQuery(optuna_id, study.id), EXPORT_PAGE):
            yield csv_text(export_csv_row(t, param_names) for t in page)
