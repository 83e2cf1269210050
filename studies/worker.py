"""`converge worker`: claim trial slots, run each in a child process, record, heartbeat.

The parent orchestrates only (it never imports torch): claim → spawn → reap → finish the
study when its last trial ends. SIGTERM/SIGINT stop the claiming; running trials finish.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import optuna

from service.db import repo
from service.db.engine import get_engine, session_scope
from service.db.errors import DatabaseUnavailable
from service.db.models import Study
from service.settings import Settings
from studies.devices import Slot
from studies.runner import EXIT_SETUP_FAILED, child_main
from studies.storage import storage_for

log = logging.getLogger("converge.worker")


@dataclass
class Running:
    slot: Slot
    claim: repo.ClaimedSlot
    process: mp.process.BaseProcess
    trial_id: Any  # multiprocessing.Value('q'): the Optuna trial id once the child has one
    started: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, settings: Settings, slots: list[Slot], *, max_trials: int | None = None,
                 exit_when_idle: bool = False):
        self.settings = settings
        self.slots = slots
        self.max_trials = max_trials  # for tests and one-shot runs: stop after this many trials
        self.exit_when_idle = exit_when_idle
        self.engine = get_engine(settings.database_url)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.running: dict[int, Running] = {}
        self.stopping = False
        self.trials_started = 0
        self._context = mp.get_context("spawn")
        self._last_heartbeat = 0.0
        self._last_stale_check = 0.0
        self._nothing_to_claim = False

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        with session_scope(self.engine) as session:
            repo.register_worker(session, self.id, socket.gethostname(), os.getpid(),
                                 ",".join(sorted({s.device for s in self.slots})), len(self.slots))
        log.info("worker %s ready with %d slot(s): %s", self.id, len(self.slots),
                 ", ".join(s.device for s in self.slots))
        try:
            while not (self.stopping and not self.running):
                self._step()
                if self._done():
                    break
                time.sleep(self.settings.worker_poll_s if not self.running else 0.2)
        finally:
            self._shutdown()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            log.warning("second signal: terminating running trials")
            for r in self.running.values():
                r.process.terminate()
        self.stopping = True
        log.info("worker %s stopping (signal %d): no new trials, waiting for %d running", self.id, signum,
                 len(self.running))

    def _done(self) -> bool:
        if self.max_trials is not None and self.trials_started >= self.max_trials and not self.running:
            return True
        return self.exit_when_idle and not self.running and self._nothing_to_claim

    def _shutdown(self) -> None:
        for r in self.running.values():
            r.process.join(timeout=30)
        try:
            with session_scope(self.engine) as session:
                repo.heartbeat_worker(session, self.id, [], state="stopped")
        except DatabaseUnavailable as exc:
            log.warning("could not record the worker's stop: %s", exc)
        log.info("worker %s stopped", self.id)

    # -- one turn of the loop --------------------------------------------------------------

    def _step(self) -> None:
        try:
            self._reap()
            self._nothing_to_claim = False
            if not self.stopping:
                self._fill_free_slots()
            now = time.monotonic()
            if now - self._last_heartbeat >= self.settings.heartbeat_interval_s / 2:
                self._heartbeat()
                self._last_heartbeat = now
            if now - self._last_stale_check >= self.settings.grace_period_s / 2:
                self._fail_stale_trials()
                self._last_stale_check = now
        except DatabaseUnavailable as exc:
            log.warning("database unavailable, retrying: %s", exc)
            time.sleep(min(5.0, self.settings.worker_poll_s * 5))

    def _fill_free_slots(self) -> None:
        for slot in self.slots:
            if slot.index in self.running:
                continue
            if self.max_trials is not None and self.trials_started >= self.max_trials:
                return
            with session_scope(self.engine) as session:
                claim = repo.claim_trial_slot(session)
            if claim is None:
                self._nothing_to_claim = True
                return
            self._spawn(slot, claim)

    def _spawn(self, slot: Slot, claim: repo.ClaimedSlot) -> None:
        trial_id = self._context.Value("q", -1)
        process = self._context.Process(
            target=_child_entry,
            args=(slot.child_env(), self.settings.model_dump(), claim, slot.trainer_device,
                  slot.torch_threads, trial_id),
            name=f"converge-trial-{claim.study_name}-{claim.slot}",
        )
        process.start()
        self.running[slot.index] = Running(slot, claim, process, trial_id)
        self.trials_started += 1
        log.info("slot %d (%s): study %s, trial slot %d", slot.index, slot.device, claim.study_name, claim.slot)

    def _reap(self) -> None:
        for index, r in list(self.running.items()):
            if r.process.is_alive():
                continue
            r.process.join()
            del self.running[index]
            code = r.process.exitcode
            if code not in (0, EXIT_SETUP_FAILED):
                self._handle_crash(r, code)
            with session_scope(self.engine) as session:
                state = repo.finish_study_if_complete(session, r.claim.study_id)
            if state:
                log.info("study %s is %s", r.claim.study_name, state)

    def _handle_crash(self, r: Running, code: int | None) -> None:
        """A child died without ending its trial: fail that trial now, or give its slot back."""
        trial_id = r.trial_id.value
        log.error("trial process for study %s exited with code %s", r.claim.study_name, code)
        if trial_id < 0:
            with session_scope(self.engine) as session:
                repo.release_trial_slot(session, r.claim.study_id)
            return
        storage = storage_for(self.settings)
        trial = storage.get_trial(trial_id)
        if trial.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_user_attr(trial_id, "error", f"trial process died (exit code {code})")
            try:
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # it finished after all, between our read and write (and stored its final diagnosis)
            with session_scope(self.engine) as session:
                repo.mark_diagnosis_final(session, r.claim.study_id, trial.number)

    def _heartbeat(self) -> None:
        current = [{"study": r.claim.study_name, "slot": r.claim.slot, "device": r.slot.device,
                    "trial_id": r.trial_id.value if r.trial_id.value >= 0 else None} for r in self.running.values()]
        with session_scope(self.engine) as session:
            repo.heartbeat_worker(session, self.id, current, state="stopping" if self.stopping else "running")
            repo.prune_dead_workers(session, timedelta(days=1))

    def _fail_stale_trials(self) -> None:
        """Trials whose process vanished with its whole machine: Optuna's heartbeat fails them."""
        with session_scope(self.engine) as session:
            studies: list[Study] = repo.list_studies(session, state="running")
        storage = storage_for(self.settings)
        for study in studies:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(optuna.load_study(study_name=study.name, storage=storage))
            with session_scope(self.engine) as session:
                repo.finish_study_if_complete(session, study.id)


def _child_entry(env: dict[str, str], *args: Any) -> None:
    """Set the slot's environment before anything imports torch, then run the trial."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which lets trials finish
    child_main(*args)
