"""`GET /metrics`: the service's state in Prometheus' text exposition format (version 0.0.4), written by hand.

Everything is read from the database at each scrape (no in-process counters), so every API
replica answers the same and a restarted one loses nothing. Studies and trials are gauges (counts
now); trial and epoch durations are histograms over every ended trial and recorded epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from sqlalchemy.orm import Session

from converge.core.db import repo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STUDY_STATES = ("queued", "running", "done", "cancelled", "failed")
TRIAL_STATES = {"RUNNING": "running", "WAITING": "waiting", "COMPLETE": "complete", "PRUNED": "pruned",
                "FAIL": "failed"}
TRIAL_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
EPOCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def _histogram(name: str, bounds: Sequence[float], cumulative: Sequence[int], count: int, total: float) -> list[str]:
    lines = [f'{name}_bucket{{le="{_num(b)}"}} {n}' for b, n in zip(bounds, cumulative)]
    return [*lines, f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {_num(total)}", f"{name}_count {count}"]


def render(session: Session, grace_period_s: float, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    lines: list[str] = []
    studies = repo.study_states(session)
    lines += _family("converge_studies", "gauge", "Studies by state.",
                     (f'converge_studies{{state="{s}"}} {studies.get(s, 0)}' for s in STUDY_STATES))
    trials = repo.optuna_trial_states(session)
    lines += _family("converge_trials", "gauge", "Trials of every study by state (failed includes attempts that "
                     "were rerun).", (f'converge_trials{{state="{label}"}} {trials.get(state, 0)}'
                                      for state, label in TRIAL_STATES.items()))
    workers = repo.list_workers(session)
    alive = [w for w in workers if w.state != "stopped" and (now - w.last_heartbeat).total_seconds() <= grace_period_s]
    lines += _family("converge_workers", "gauge", "Registered workers, alive (a heartbeat within the grace period) "
                     "or not.", [f'converge_workers{{alive="true"}} {len(alive)}',
                                 f'converge_workers{{alive="false"}} {len(workers) - len(alive)}'])
    lines += _family("converge_worker_last_heartbeat_timestamp_seconds", "gauge",
                     "Unix time of each worker's last heartbeat.",
                     (f'converge_worker_last_heartbeat_timestamp_seconds{{worker="{_label(w.id)}",'
                      f'host="{_label(w.host)}",state="{_label(w.state)}"}} '
                      f"{_num(round(w.last_heartbeat.timestamp(), 3))}" for w in workers))
    lines += _family("converge_worker_running_trials", "gauge", "Trials each worker runs now.",
                     (f'converge_worker_running_trials{{worker="{_label(w.id)}"}} {len(w.current_trials or [])}'
                      for w in workers))
    durations = [(end - start).total_seconds() for start, end in repo.finished_trial_times(session)]
    durations = [d for d in durations if d >= 0]
    lines += _family("converge_trial_duration_seconds", "histogram", "Wall time of ended trials (complete, pruned, "
                     "failed), start to end.",
                     _histogram("converge_trial_duration_seconds", TRIAL_BUCKETS,
                                [sum(d <= b for d in durations) for b in TRIAL_BUCKETS], len(durations),
                                sum(durations)))
    cumulative, count, total = repo.epoch_seconds_histogram(session, EPOCH_BUCKETS)
    lines += _family("converge_epoch_duration_seconds", "histogram", "Training time of each recorded epoch.",
                     _histogram("converge_epoch_duration_seconds", EPOCH_BUCKETS, cumulative, count, total))
    return "\n".join(lines) + "\n"
