"""The pure rules of scheduled sweeps, testable without a database or a server.

- cron and time zone: validation, the fire times between two moments (`cronsim`, evaluated in the
  schedule's zone, so daylight-saving changes behave as cron's do: a wall-clock time that does not
  exist that day fires at the first minute after the jump, and one that happens twice fires once);
- each run's study name, `{prefix}-{YYYYMMDD-HHMM}` in the schedule's zone;
- the misfire and overlap decisions;
- the warm start's parameter sets;
- the run report: the comparison with the previous run, and the regression flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from converge.studies.spec import FloatRange, IntChoices, IntRange, SearchSpace

NAME_SUFFIX_LEN = len("-YYYYMMDD-HHMM")
MAX_PREFIX_LEN = 100 - NAME_SUFFIX_LEN - 2  # room for "-2" when two fire times share a local minute (DST)
MAX_FIRES_PER_TICK = 100  # after a long downtime only the latest missed fire times are recorded
OVERLAP_POLICIES = ("skip", "queue")


def check_cron(expr: str) -> str:
    """The expression, stripped, if it is a 5-field cron expression; ValueError naming it otherwise."""
    expr = " ".join(str(expr).split())
    if len(expr.split(" ")) != 5:
        raise ValueError(f"cron expression {expr!r} must have 5 fields (minute hour day-of-month month "
                         "day-of-week)")
    try:
        next(CronSim(expr, datetime(2000, 1, 1, tzinfo=timezone.utc)))
    except (CronSimError, ValueError, LookupError, StopIteration) as exc:
        raise ValueError(f"bad cron expression {expr!r}: {exc}") from None
    return expr


def check_timezone(name: str) -> ZoneInfo:
    """The IANA zone of that name; ValueError naming it otherwise."""
    try:
        if not name or name != name.strip() or name.startswith("/") or ".." in name:
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or UTC") from None


def fire_times(cron: str, zone: str, after: datetime, until: datetime,
               limit: int = MAX_FIRES_PER_TICK) -> list[datetime]:
    """The fire times t with after < t <= until, in UTC; the latest `limit` of them when there are more."""
    tz = check_timezone(zone)
    found: list[datetime] = []
    for t in CronSim(cron, after.astimezone(tz)):
        t = t.astimezone(timezone.utc)
        if t <= after:
            continue
        if t > until:
            break
        found.append(t)
        if len(found) > limit:
            found.pop(0)
    return found


def next_fire_time(cron: str, zone: str, after: datetime) -> datetime:
    """The first fire time strictly after `after`, in UTC."""
    tz = check_timezone(zone)
    for t in CronSim(cron, after.astimezone(tz)):
        t = t.astimezone(timezone.utc)
        if t > after:
            return t
    raise ValueError(f"cron expression {cron!r} never fires")  # pragma: no cover - cronsim raises first


def run_name(prefix: str, fire_time: datetime, zone: str) -> str:
    """A run's study name: `{prefix}-{YYYYMMDD-HHMM}`, the fire time in the schedule's zone."""
    return f"{prefix}-{fire_time.astimezone(check_timezone(zone)):%Y%m%d-%H%M}"


# ---------------------------------------------------------------- misfire and overlap


@dataclass(frozen=True)
class Fire:
    fire_time: datetime
    action: Literal["run", "skip"]
    reason: str | None = None


def plan_fires(due: list[datetime], now: datetime, grace_s: float) -> list[Fire]:
    """What to do with the fire times due by `now` (oldest first).

    The latest one is run if it is at most `grace_s` late; every other one is recorded as skipped: too
    late (the scheduler was down), or superseded by a later fire time (a sweep runs once after downtime).
    """
    plans: list[Fire] = []
    for i, t in enumerate(due):
        late = (now - t).total_seconds()
        if late > grace_s:
            plans.append(Fire(t, "skip", f"missed: {late:.0f} s late, beyond the misfire grace of {grace_s:g} s"))
        elif i < len(due) - 1:
            plans.append(Fire(t, "skip", f"missed: superseded by the fire time {due[-1].isoformat()}"))
        else:
            plans.append(Fire(t, "run"))
    return plans


def overlap_action(policy: str, previous_active: bool) -> Literal["launch", "queue", "skip"]:
    """A fire while the schedule's previous run is still going is skipped or queued, per schedule."""
    if not previous_active:
        return "launch"
    return "queue" if policy == "queue" else "skip"


# ---------------------------------------------------------------- warm start


def _fits(param: Any, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(param, IntChoices):
        return value in param.choices
    if isinstance(param, IntRange):
        return float(value).is_integer() and param.low <= value <= param.high
    if isinstance(param, FloatRange):
        return param.low <= value <= param.high
    return False  # a fixed value: the trial gets it anyway


def top_k_params(trials: Iterable[tuple[float | None, Mapping[str, Any]]], direction: str, k: int,
                 space: SearchSpace) -> list[dict[str, Any]]:
    """The best `k` distinct parameter sets of the previous run's completed trials (finite values only),
    best first, each reduced to the parameters the new search space sweeps and contains (the rest are
    sampled as usual, fixed ones keep their value)."""
    if k <= 0:
        return []
    ranked = sorted(((v, p) for v, p in trials if v is not None and math.isfinite(v)),
                    key=lambda vp: vp[0], reverse=direction == "maximize")
    chosen: list[dict[str, Any]] = []
    for _, params in ranked:
        kept = {name: value for name, value in params.items()
                if name in SearchSpace.model_fields and _fits(getattr(space, name), value)}
        if kept and kept not in chosen:
            chosen.append(kept)
        if len(chosen) == k:
            break
    return chosen


# ---------------------------------------------------------------- run report


@dataclass(frozen=True)
class RunSummary:
    """What a finished run is compared on."""

    study: str
    state: str
    best_value: float | None
    best_params: dict[str, Any]
    verdicts: dict[str, int]


def json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _worsening(current: float, previous: float, direction: str) -> float:
    """How much worse `current` is than `previous` (negative: better)."""
    return current - previous if direction == "minimize" else previous - current


def is_regression(current: float | None, previous: float | None, direction: str, threshold: float) -> bool:
    """The best worsened by more than `threshold` of the previous best's magnitude (no best at all, where the
    previous run had one, is a regression too)."""
    if previous is None or not math.isfinite(previous):
        return False
    if current is None or math.isnan(current):
        return True
    return _worsening(current, previous, direction) > threshold * abs(previous)


def run_report(current: RunSummary, previous: RunSummary | None, direction: str, threshold: float) -> dict[str, Any]:
    """A finished run compared with the schedule's previous finished run (null fields where there is none)."""
    report: dict[str, Any] = {
        "study": current.study, "state": current.state, "direction": direction,
        "best_value": json_float(current.best_value), "best_params": current.best_params,
        "verdicts": dict(current.verdicts), "previous_study": None, "previous_best_value": None,
        "best_delta": None, "verdict_shift": {}, "params_changed": {}, "regression": False,
        "regression_threshold": threshold,
    }
    if previous is None:
        return report
    report["previous_study"] = previous.study
    report["previous_best_value"] = json_float(previous.best_value)
    if current.best_value is not None and previous.best_value is not None:
        report["best_delta"] = json_float(current.best_value - previous.best_value)
    shift = {v: current.verdicts.get(v, 0) - previous.verdicts.get(v, 0)
             for v in sorted(set(current.verdicts) | set(previous.verdicts))}
    report["verdict_shift"] = {v: n for v, n in shift.items() if n}
    report["params_changed"] = {
        p: {"from": previous.best_params.get(p), "to": current.best_params.get(p)}
        for p in sorted(set(current.best_params) | set(previous.best_params))
        if current.best_params.get(p) != previous.best_params.get(p)}
    report["regression"] = is_regression(current.best_value, previous.best_value, direction, threshold)
    return report


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
