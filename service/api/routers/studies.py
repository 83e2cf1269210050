"""`/v1/studies`: submit studies and read their trials, per-epoch metrics and diagnoses."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Response, status
from fastapi.responses import StreamingResponse

from converge.core.db.engine import get_engine, session_scope
from converge.service import trial_pages, views
from converge.service.api.deps import (
    FormatDep,
    SessionDep,
    SessionRoute,
    SettingsDep,
    StorageDep,
    error_responses,
    require_scope,
)
from converge.service.schemas import (
    METRICS_COLUMNS_EXAMPLE,
    METRICS_CSV_EXAMPLE,
    METRICS_HISTORY_EXAMPLE,
    SPEC_EXAMPLES,
    STUDY_EXAMPLE,
    STUDY_EXPORT_CSV_EXAMPLE,
    STUDY_EXPORT_EXAMPLE,
    TRIAL_PAGE_CURSOR_EXAMPLE,
    MetricsColumnsOut,
    MetricsOut,
    RepairOut,
    StudyDiagnosisOut,
    StudyExport,
    StudyOut,
    StudyState,
    TrialDetail,
    TrialDiagnosisOut,
    TrialPage,
    TrialState,
    Verdict,
)
from converge.studies import lifecycle, repair
from converge.studies.spec import MAX_TRIALS, NAME_PATTERN, StudySpec

router = APIRouter(prefix="/v1/studies", tags=["studies"], route_class=SessionRoute)

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, description="the study's unique name, [A-Za-z0-9._-]{1,100}",
                                openapi_examples={"a study": {"value": "digits-mlp"}})]
TrialNumber = Annotated[int, Path(ge=0, le=trial_pages.MAX_TRIAL_NUMBER,
                                  description="the trial's number within its study, from 0",
                                  openapi_examples={"a trial": {"value": 7}})]
SpecBody = Annotated[StudySpec, Body(description="the study spec; every field but `name` has a default",
                                     openapi_examples=SPEC_EXAMPLES)]

READ, WRITE = [Depends(require_scope("read"))], [Depends(require_scope("write"))]
NO_STUDY = {404: "no such study"}
NO_TRIAL = {404: "no such study or trial"}
BAD_NAME = "the study name does not match [A-Za-z0-9._-]{1,100}"
BAD_PATH = (f"{BAD_NAME}, or the trial number is not an integer in 0..{trial_pages.MAX_TRIAL_NUMBER}; `detail` says "
            "which")


def _list_example(example: list[Any]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route whose body is a list, with an example (a list's schema has none of its own)."""
    return {200: {"content": {"application/json": {"example": example}}}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyOut, dependencies=WRITE,
             responses=error_responses("write", {409: "a study of that name exists"}, body=True,
                                       invalid="the body is not JSON or not a valid spec (a name outside "
                                               f"[A-Za-z0-9._-]{{1,100}}, n_trials outside 1..{MAX_TRIALS}, an unknown "
                                               "field, model, dataset, sampler or pruner, a range whose low is not "
                                               "below its high, ...); `problems` lists every problem"))
def create_study(spec: SpecBody, settings: SettingsDep, session: SessionDep, storage: StorageDep) -> StudyOut:
    """Submit a study. It is queued; workers claim its trials. Every spec field but `name` has a default."""
    lifecycle.submit_study(settings, spec)
    return views.get_study_out(session, storage, spec.name)


@router.get("", response_model=list[StudyOut], dependencies=READ,
            responses={**error_responses("read", invalid="an unknown `state`"), **_list_example([STUDY_EXAMPLE])})
def list_studies(session: SessionDep, storage: StorageDep,
                 state: Annotated[StudyState | None, Query(description="only studies in this state",
                                                           openapi_examples={"running": {"value": "running"}})] = None,
                 ) -> list[StudyOut]:
    """All studies, newest first, with trial counts and the best trial so far."""
    return views.list_study_outs(session, storage, state)


@router.get("/{name}", response_model=StudyOut, dependencies=READ,
            responses=error_responses("read", NO_STUDY, invalid=BAD_NAME))
def get_study(name: StudyName, session: SessionDep, storage: StorageDep) -> StudyOut:
    """One study: state, spec, trial counts by state, best trial."""
    return views.get_study_out(session, storage, name)


@router.get("/{name}/diagnosis", response_model=StudyDiagnosisOut, dependencies=READ,
            responses=error_responses("read", NO_STUDY, invalid=BAD_NAME))
def get_study_diagnosis(name: StudyName, session: SessionDep) -> StudyDiagnosisOut:
    """The whole study's diagnosis, for planning the next sweep.

    - `verdicts`: trials per verdict of their latest diagnosis (final once the trial ended);
      `undiagnosed` trials are counted apart, and failed attempts that were rerun not at all.
    - `regions`: the hyperparameter thresholds that explain the unhealthy trials, all unhealthy
      verdicts together, e.g. "lr > 0.3: 6 of 6 trials unhealthy: diverged 3, oscillating 2,
      underfitting 1" (ended trials only; at least 2 unhealthy trials, 60% of the region's trials
      and 20 points above the unhealthy share in the study, and unlikely by chance); a single
      verdict's region where the group shows none on that side.
    - `importance`: Optuna's PED-ANOVA parameter importance over the completed trials (up to
      5,000, evenly subsampled); null with a `reason` under 10 of them.
    - `recommendation`: a complete spec named NAME-next that `POST /v1/studies` accepts as it is:
      each swept range narrowed to the best quarter of the completed trials (with a margin) and
      away from the unhealthy regions, fixed values kept; `changes` says what moved.
    """
    return views.get_study_diagnosis(session, name)


@router.post("/{name}/cancel", response_model=StudyOut, dependencies=WRITE,
             responses=error_responses("write", {**NO_STUDY, 409: "the study has already ended (done, failed or "
                                                 "cancelled)"}, invalid=BAD_NAME))
def cancel_study(name: StudyName, settings: SettingsDep, session: SessionDep, storage: StorageDep) -> StudyOut:
    """Cancel a queued or running study: no new trial of it starts, and its running trials stop
    within one epoch (they are failed with the reason). Returns the study, now `cancelled`."""
    lifecycle.cancel_study(settings, name)
    return views.get_study_out(session, storage, name)


def _csv(text: Any, filename: str | None = None) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else None
    if isinstance(text, str):
        return Response(text, media_type="text/csv; charset=utf-8", headers=headers)
    return StreamingResponse(text, media_type="text/csv; charset=utf-8", headers=headers)


def _csv_content(example: str, what: str) -> dict[str, Any]:
    return {"text/csv": {"schema": {"type": "string", "description": f"{what}, with `Accept: text/csv` or "
                                                                     "`?format=csv`"},
                         "example": example}}


@router.get("/{name}/trials", response_model=TrialPage, dependencies=READ,
            responses=error_responses("read", NO_STUDY,
                                      invalid="a bad study name, a `limit` outside 1..1000, an unknown `state`, "
                                              "`verdict` or `sort`, or a `cursor` that is not one this API issued or "
                                              "was issued for another study, sort or filters; `detail` says which"))
def list_trials(
    name: StudyName, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=trial_pages.MAX_LIMIT, description="trials per page, 1..1000",
                                openapi_examples={"page of 50": {"value": 50}})] = trial_pages.DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="the previous page's `next_cursor`, as it is; leave it out for "
                                        "the first page. Valid only with the same `sort`, `state` and `verdict`",
                                        openapi_examples={"next page": {"value": TRIAL_PAGE_CURSOR_EXAMPLE}})] = None,
    state: Annotated[TrialState | None, Query(description="only trials in this state",
                                              openapi_examples={"completed": {"value": "complete"}})] = None,
    verdict: Annotated[Verdict | None, Query(description="only trials whose latest diagnosis has this verdict",
                                             openapi_examples={"diverged": {"value": "diverged"}})] = None,
    sort: Annotated[Literal["number", "objective"], Query(
        description="`number` (ascending), or `objective`: the best completed trials first by the study's "
                    "direction, then every trial without a completed value (pruned, failed, running, waiting) "
                    "by number", openapi_examples={"best first": {"value": "objective"}})] = "number",
) -> TrialPage:
    """A page of the study's trials: params, state, objective value, epochs recorded so far, error if failed,
    and the verdict and confidence of each trial's latest diagnosis (null before its first epoch).

    Pages are keyset pages: pass `next_cursor` back as `cursor` (with the same `sort`, `state` and
    `verdict`) until it is null. Trials added while you page never make a page repeat or skip a
    trial that existed when you began; a trial that changes state or gets its value meanwhile may
    move in or out of a filtered or objective-sorted listing. `total` counts the trials matching
    the filters at each request.
    """
    return trial_pages.trial_page(session, name, limit=limit, cursor=cursor, state=state, verdict=verdict,
                                  sort=sort)


@router.get("/{name}/trials/{number}", response_model=TrialDetail, dependencies=READ,
            responses=error_responses("read", NO_TRIAL, invalid=BAD_PATH))
def get_trial(name: StudyName, number: TrialNumber, session: SessionDep) -> TrialDetail:
    """One trial: its fields as in the list, the objective values reported to Optuna at each epoch, its user
    attributes, its latest diagnosis, `attempts` (its line of attempts, first to latest: failed attempts that were
    rerun as the next one, with each one's state, times, epochs and error) and `train_seconds`."""
    return trial_pages.trial_detail(session, name, number)


@router.get("/{name}/trials/{number}/diagnosis", response_model=TrialDiagnosisOut, dependencies=READ,
            responses=error_responses("read", {404: "no such study or trial, or the trial has no diagnosis yet "
                                                    "(no epoch recorded)"}, invalid=BAD_PATH))
def get_trial_diagnosis(name: StudyName, number: TrialNumber, session: SessionDep,
                        storage: StorageDep) -> TrialDiagnosisOut:
    """The trial's convergence diagnosis: verdict, confidence, onset epoch, findings, remedies, summary.

    It is rewritten after every epoch from the history so far (`epoch` is the last one it saw)
    and marked `final` once the trial has ended.
    """
    return views.get_trial_diagnosis(session, storage, name, number)


@router.post("/{name}/trials/{number}/repair", status_code=status.HTTP_201_CREATED, response_model=RepairOut,
             dependencies=WRITE,
             responses=error_responses("write", {**NO_TRIAL, 409: "the trial is running or waiting, healthy, has "
                                                 "no diagnosis or no remedy that fits the search space, or was "
                                                 "already repaired, or the study was cancelled; `detail` says which"},
                                       invalid=BAD_PATH))
def repair_trial(name: StudyName, number: TrialNumber, settings: SettingsDep) -> RepairOut:
    """Queue an unhealthy trial again as a new trial, with its diagnosis' first remedy applied.

    The remedy (e.g. lr ×0.1) is kept inside the study's search space, and the study gets one more
    trial to run it (a done or failed study runs again; a cancelled one is a 409). The origin's
    diagnosis then reports the repair's outcome.
    """
    return RepairOut(**repair.repair_summary(repair.repair_trial(settings, name, number)))


@router.get("/{name}/trials/{number}/metrics", response_model=MetricsColumnsOut | MetricsOut, dependencies=READ,
            responses={**error_responses("read", NO_TRIAL, invalid=f"{BAD_PATH}; or a `format` other than json or "
                                                                   "csv, or a `layout` other than columns or history"),
                       200: {"description": "the metrics, as columns (default), as a history (`layout=history`) "
                                            "or as CSV",
                             "content": {"application/json": {"examples": {
                                 "columns": {"summary": "layout=columns (default)", "value": METRICS_COLUMNS_EXAMPLE},
                                 "history": {"summary": "layout=history", "value": METRICS_HISTORY_EXAMPLE}}},
                                 **_csv_content(METRICS_CSV_EXAMPLE, "one row per epoch, empty cells for nulls")}}})
def get_trial_metrics(
    name: StudyName, number: TrialNumber, session: SessionDep, fmt: FormatDep,
    layout: Annotated[Literal["columns", "history"], Query(
        description="JSON layout: `columns` (one list per metric) or `history` (one object per epoch: the "
                    "diagnosis input format)", openapi_examples={"history": {"value": "history"}})] = "columns",
) -> MetricsColumnsOut | MetricsOut | Response:
    """Per-epoch metrics, written as each epoch ends (so a running trial shows its progress): epoch,
    train_loss, val_loss, val_acc, grad_norm, param_norm, lr and epoch_seconds.

    - JSON, `layout=columns` (the default): `columns` holds one list per metric, index i being epoch
      `columns.epoch[i]`.
    - JSON, `layout=history`: a history in the diagnosis input format, which `POST /v1/diagnose`
      accepts as it is.
    - CSV (`Accept: text/csv` or `?format=csv`): a header row, then one row per epoch; empty cells
      for nulls.

    NaN and infinities are the strings "NaN", "Infinity" and "-Infinity" in JSON and in CSV.
    """
    if fmt == "csv":
        return _csv(trial_pages.metrics_csv(session, name, number))
    if layout == "history":
        return trial_pages.metrics_history(session, name, number)
    return trial_pages.metrics_columns(session, name, number)


@router.get("/{name}/export", response_model=StudyExport, dependencies=READ,
            responses={**error_responses("read", NO_STUDY, invalid=f"{BAD_NAME}, or a `format` other than json "
                                                                   "or csv"),
                       200: {"description": "the study and all its trials, as JSON or CSV",
                             "content": {"application/json": {"example": STUDY_EXPORT_EXAMPLE},
                                         **_csv_content(STUDY_EXPORT_CSV_EXAMPLE, "one row per trial")}}})
def export_study(name: StudyName, settings: SettingsDep, storage: StorageDep, fmt: FormatDep) -> Response:
    """Every trial of the study, streamed (read 1,000 trials at a time), as an attachment.

    - JSON (default): `{"study": ..., "trials": [...]}`, the study as `GET /v1/studies/{name}` and
      each trial as in the trial list, by number.
    - CSV (`Accept: text/csv` or `?format=csv`): one row per trial, by number: number, state,
      value, one `params_NAME` column per parameter, datetime_start, datetime_complete,
      duration_s, epochs_recorded, verdict, confidence, retry_of, rerun_as, repair_of,
      repaired_as, pruned_by (the rule), error; empty cells for nulls, non-finite values as in
      the JSON.
    """
    engine = get_engine(settings.database_url, settings.sqlite_busy_timeout_s)
    with session_scope(engine) as session:  # its own: the stream outlives the request's dependencies
        study = views.get_study_out(session, storage, name)  # a 404 before anything is streamed
    if fmt == "csv":
        return _csv(trial_pages.export_csv(engine, name), f"{name}.csv")
    return StreamingResponse(trial_pages.export_json(engine, name, study), media_type="application/json",
                             headers={"Content-Disposition": f'attachment; filename="{name}.json"'})
