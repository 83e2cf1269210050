"""`/v1/studies`: submit studies and read their trials, per-epoch metrics and diagnoses."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from service import views
from service.api.deps import SessionDep, SettingsDep, StorageDep
from service.api.schemas import (
    MetricsOut,
    RepairOut,
    StudyDiagnosisOut,
    StudyOut,
    StudyState,
    TrialDetail,
    TrialDiagnosisOut,
    TrialOut,
    Verdict,
)
from studies import lifecycle, repair
from studies.spec import NAME_PATTERN, StudySpec

router = APIRouter(prefix="/v1/studies", tags=["studies"])

StudyName = Annotated[str, Path(pattern=NAME_PATTERN, description="the study's unique name")]
TrialNumber = Annotated[int, Path(ge=0, description="the trial's number within its study")]

_ERRORS = {404: {"description": "no such study or trial"}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyOut,
             responses={409: {"description": "a study of that name exists"},
                        422: {"description": "the spec is invalid; `detail` lists every problem"}})
def create_study(spec: StudySpec, settings: SettingsDep, session: SessionDep, storage: StorageDep) -> StudyOut:
    """Submit a study. It is queued; workers claim its trials. Every spec field but `name` has a default."""
    lifecycle.submit_study(settings, spec)
    return views.get_study_out(session, storage, spec.name)


@router.get("", response_model=list[StudyOut])
def list_studies(session: SessionDep, storage: StorageDep,
                 state: Annotated[StudyState | None, Query(description="only studies in this state")] = None,
                 ) -> list[StudyOut]:
    """All studies, newest first, with trial counts and the best trial so far."""
    return views.list_study_outs(session, storage, state)


@router.get("/{name}", response_model=StudyOut, responses=_ERRORS)
def get_study(name: StudyName, session: SessionDep, storage: StorageDep) -> StudyOut:
    """One study: state, spec, trial counts by state, best trial."""
    return views.get_study_out(session, storage, name)


@router.get("/{name}/diagnosis", response_model=StudyDiagnosisOut, responses={404: {"description": "no such study"}})
def get_study_diagnosis(name: StudyName, session: SessionDep, storage: StorageDep) -> StudyDiagnosisOut:
    """The whole study's diagnosis, for planning the next sweep.

    - `verdicts`: trials per verdict of their latest diagnosis (final once the trial ended);
      `undiagnosed` trials are counted apart, and failed attempts that were rerun not at all.
    - `regions`: for each unhealthy verdict, the hyperparameter thresholds that explain it, e.g.
      "lr > 0.21: 9 of 10 trials diverged" (ended trials only; at least 2 trials with the verdict,
      60% of the region's trials and 20 points above the verdict's share in the study, and
      unlikely by chance).
    - `importance`: Optuna's PED-ANOVA parameter importance over the completed trials (up to
      5,000, evenly subsampled); null with a `reason` under 10 of them.
    - `recommendation`: a complete spec named NAME-next that `POST /v1/studies` accepts as it is:
      each swept range narrowed to the best quarter of the completed trials (with a margin) and
      away from the unhealthy regions, fixed values kept; `changes` says what moved.
    """
    return views.get_study_diagnosis(session, storage, name)


@router.post("/{name}/cancel", response_model=StudyOut,
             responses={**_ERRORS, 409: {"description": "the study has already ended (done, failed or cancelled)"}})
def cancel_study(name: StudyName, settings: SettingsDep, session: SessionDep, storage: StorageDep) -> StudyOut:
    """Cancel a queued or running study: no new trial of it starts, and its running trials stop
    within one epoch (they are failed with the reason). Returns the study, now `cancelled`."""
    lifecycle.cancel_study(settings, name)
    return views.get_study_out(session, storage, name)


@router.get("/{name}/trials", response_model=list[TrialOut],
            responses={**_ERRORS, 422: {"description": "`verdict` is not one of the diagnosis verdicts"}})
def list_trials(name: StudyName, session: SessionDep, storage: StorageDep,
                verdict: Annotated[Verdict | None, Query(description="only trials whose latest diagnosis has "
                                                                     "this verdict")] = None,
                ) -> list[TrialOut]:
    """The study's trials in order: params, state, objective value, epochs recorded so far, error if failed,
    and the verdict and confidence of each trial's latest diagnosis (null before its first epoch)."""
    return views.list_trial_outs(session, storage, name, verdict)


@router.get("/{name}/trials/{number}", response_model=TrialDetail, responses=_ERRORS)
def get_trial(name: StudyName, number: TrialNumber, session: SessionDep, storage: StorageDep) -> TrialDetail:
    """One trial, with the objective values reported to Optuna at each epoch and its latest diagnosis."""
    return views.get_trial_detail(session, storage, name, number)


@router.get("/{name}/trials/{number}/diagnosis", response_model=TrialDiagnosisOut,
            responses={404: {"description": "no such study or trial, or the trial has no diagnosis yet "
                                            "(no epoch recorded)"}})
def get_trial_diagnosis(name: StudyName, number: TrialNumber, session: SessionDep,
                        storage: StorageDep) -> TrialDiagnosisOut:
    """The trial's convergence diagnosis: verdict, confidence, onset epoch, findings, remedies, summary.

    It is rewritten after every epoch from the history so far (`epoch` is the last one it saw)
    and marked `final` once the trial has ended.
    """
    return views.get_trial_diagnosis(session, storage, name, number)


@router.post("/{name}/trials/{number}/repair", status_code=status.HTTP_201_CREATED, response_model=RepairOut,
             responses={**_ERRORS, 409: {"description": "the trial is running or waiting, healthy, has no "
                                                       "diagnosis or no remedy that fits the search space, or "
                                                       "was already repaired; `detail` says which"}})
def repair_trial(name: StudyName, number: TrialNumber, settings: SettingsDep) -> RepairOut:
    """Queue an unhealthy trial again as a new trial, with its diagnosis' first remedy applied.

    The remedy (e.g. lr ×0.1) is kept inside the study's search space, and the study gets one more
    trial to run it (a done or failed study runs again; a cancelled one is a 409). The origin's
    diagnosis then reports the repair's outcome.
    """
    return RepairOut(**repair.repair_summary(repair.repair_trial(settings, name, number)))


@router.get("/{name}/trials/{number}/metrics", response_model=MetricsOut, responses=_ERRORS)
def get_trial_metrics(name: StudyName, number: TrialNumber, session: SessionDep,
                      storage: StorageDep) -> MetricsOut:
    """Per-epoch metrics, written as each epoch ends (so a running trial shows its progress).

    The body is a history in the diagnosis input format; NaN and infinities are sent as the
    strings "NaN", "Infinity" and "-Infinity".
    """
    return views.get_trial_metrics(session, storage, name, number)
