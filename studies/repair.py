"""Repair an unhealthy trial: queue it again as a new trial with its diagnosis' first remedy applied.

The new trial is a WAITING Optuna trial with the origin's parameters changed by the remedy
(kept inside the study's search space), which the study's next claim runs; the study gets
one more trial to run it (`n_trials` + 1, and a done or failed study runs again). `converge_trial_repairs`
links the origin to its repair; the repair carries `converge_repair_of`. The origin's diagnosis
then reports how the repair went.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from optuna.trial import TrialState

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.models import TrialRepair
from converge.core.errors import Conflict, NotFound
from converge.core.settings import Settings
from converge.studies.diagnosis.remedies import apply_remedy
from converge.studies.diagnosis.result import Remedy
from converge.studies.pruning import DIAGNOSIS_RULES, PRUNED_BY_ATTR
from converge.studies.spec import PARAM_NAMES, FloatRange, IntChoices, IntRange, SearchSpace, StudySpec
from converge.studies.storage import optuna_study_id, storage_for, trial_by_number

REPAIR_OF_ATTR = "converge_repair_of"

log = logging.getLogger("converge.repair")


def repair_trial(settings: Settings, name: str, number: int, *, automatic: bool = False) -> TrialRepair:
    """Queue the repair of trial `number` of study `name`; NotFound or Conflict (with the reason) otherwise."""
    engine = get_engine(settings.database_url)
    storage = storage_for(settings)
    with session_scope(engine) as session:
        study = repo.get_study(session, name)
        spec = StudySpec.model_validate(study.spec)
        row = repo.get_diagnosis(session, study.id, number)
        done = repo.get_repair(session, study.id, number)
    trial = trial_by_number(storage, name, number)
    if study.state == "cancelled":
        raise Conflict(f"study {name!r} was cancelled: its trials are not repaired")
    if done is not None:
        raise Conflict(f"trial {number} was already repaired as trial {done.repair_number}")
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        raise Conflict(f"trial {number} is {trial.state.name.lower()}: repair it once it has ended")
    if row is None:
        raise Conflict(f"trial {number} has no diagnosis (no epoch was recorded): nothing to repair")
    if row.healthy:
        raise Conflict(f"trial {number} is healthy ({row.verdict}): nothing to repair")
    remedies = row.diagnosis.get("remedies", [])
    remedy, params = first_applicable_remedy(remedies, trial.params, spec.search_space)
    if remedy is None:
        tried = "; ".join(f"{r['param']} {r['action']}" for r in remedies) or "none"
        raise Conflict(f"trial {number} ({row.verdict}) has no remedy that changes a hyperparameter within the "
                       f"study's search space (its remedies: {tried})")
    if automatic:
        limit = spec.auto_repair.max if spec.auto_repair is not None else 0
        with session_scope(engine) as session:
            if not repo.reserve_auto_repair(session, study.id, limit):
                raise Conflict(f"study {name!r} has had its {limit} automatic repair(s)")

    copy = optuna.trial.create_trial(state=TrialState.WAITING, params=params, distributions=trial.distributions,
                                     user_attrs={REPAIR_OF_ATTR: number})
    copy_id = storage.create_new_trial(optuna_study_id(storage, name), template_trial=copy)
    copy_number = storage.get_trial_number_from_id(copy_id)
    with session_scope(engine) as session:
        if not repo.record_repair(session, study.id, number, copy_number, remedy, params, automatic):
            storage.set_trial_state_values(copy_id, TrialState.FAIL)  # lost a race: the copy must not run
            raise Conflict(f"trial {number} was already repaired")
        repair = repo.get_repair(session, study.id, number)
    assert repair is not None
    return repair


def auto_repair(settings: Settings, spec: StudySpec, trial: optuna.trial.FrozenTrial) -> TrialRepair | None:
    """After a trial ended: repair it when the spec's `auto_repair` asks and it ended unhealthy.

    Trials the base pruner stopped are left alone: it judged them worse than their peers, and
    their diagnosis saw a cut-short run. Reruns of crashed or interrupted attempts are not
    repairs either. Never raises: a trial that cannot be repaired is logged and left as it is.
    """
    if spec.auto_repair is None or trial.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        return None
    pruned_by = trial.user_attrs.get(PRUNED_BY_ATTR)
    if trial.state == TrialState.PRUNED and not (pruned_by and pruned_by.get("rule") in DIAGNOSIS_RULES):
        return None
    if str(trial.user_attrs.get("error", "")).startswith(("TrialInterrupted", "StudyCancelled")):
        return None
    try:
        repair = repair_trial(settings, spec.name, trial.number, automatic=True)
    except (Conflict, NotFound) as exc:
        log.info("trial %d of %s not repaired automatically: %s", trial.number, spec.name, exc)
        return None
    except Exception:
        log.exception("trial %d of %s: the automatic repair failed", trial.number, spec.name)
        return None
    log.info("trial %d of %s repaired automatically as trial %d (%s %s)", trial.number, spec.name,
             repair.repair_number, repair.remedy["param"], repair.remedy["action"])
    return repair


def first_applicable_remedy(remedies: list[dict[str, Any]], params: dict[str, Any],
                            space: SearchSpace) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The first remedy that changes one of the five hyperparameters within the search space, and the
    parameters it gives; (None, params) when none does (gradient clipping, the model, a fixed value,
    a value already at the edge of its range)."""
    for remedy in remedies:
        name = remedy["param"]
        if name not in PARAM_NAMES or name not in params:
            continue
        fields = {k: remedy.get(k) for k in ("param", "action", "reason", "factor", "value")}
        wanted = apply_remedy(params, Remedy(**fields))[name]
        fitted = _within(getattr(space, name), wanted, params[name])
        if fitted is not None:
            return remedy, {**params, name: fitted}
    return None, params


def _within(spec: Any, wanted: float | int, current: float | int) -> float | int | None:
    """`wanted` moved into the search space, or None when that leaves the value where it is."""
    if isinstance(spec, FloatRange | IntRange):
        value = min(max(wanted, spec.low), spec.high)
        value = int(round(value)) if isinstance(spec, IntRange) else float(value)
    elif isinstance(spec, IntChoices):  # the nearest choice on the remedy's side of the current value
        side = [c for c in spec.choices if (c - current) * (wanted - current) > 0]
        value = min(side, key=lambda c: abs(c - wanted)) if side else current
    else:  # a fixed value stays fixed
        return None
    return None if math.isclose(value, current) else value


def repair_summary(repair: TrialRepair) -> dict[str, Any]:
    """What a repair changed, for the API and CLI."""
    return {"trial": repair.trial_number, "repair_trial": repair.repair_number, "remedy": repair.remedy,
            "params": repair.params, "automatic": repair.automatic}

