"""`converge worker`: claim trial slots, run them in long-lived slot processes, record, heartbeat.

The parent orchestrates only (it never imports torch): it keeps one process per slot (torch
imported once), hands each a claimed trial slot at a time, reaps the answers and finishes a
study when its last trial ends. A slot process that dies takes only its own trial with it: the
trial is failed and rerun (`studies.retries`), and the slot gets a fresh process.

A trial the database dropped (down, read-only or full for longer than its writes wait) is
settled the same way, by its slot process once the database answers or else here: the worker's
loop waits out the outage (`_step`) and goes on.

SIGTERM/SIGINT: no new claims; running trials stop at their next epoch's end and are rerun by
whoever claims next, and the worker exits. A trial that does not reach its epoch's end within
`stop_timeout_s` is killed and rerun the same way; a second signal kills at once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import optuna

from converge.core.db import repo
from converge.core.db.engine import describe_cause, get_engine, is_transient, session_scope
from converge.core.db.models import Study
from converge.core.errors import DatabaseUnavailable
from converge.core.settings import Settings
from converge.studies.devices import Slot
from converge.studies.plots.dashboard import StudyFigures
from converge.studies.retries import CRASHED, INTERRUPTED, settle_dead_attempt
from converge.studies.runner import NOT_STARTED, SETUP_FAILED, STORAGE_LOST, TRIAL_ENDED, slot_main
from converge.studies.storage import storage_for

log = logging.getLogger("converge.worker")

DIED = "died"  # not an answer: the slot process died while it held a claim


@dataclass
class SlotProcess:
    """A slot's child process and the trial slot it is running, if any."""

    slot: Slot
    process: mp.process.BaseProcess
    conn: Connection
    trial_id: Any  # multiprocessing.Value('q'): the running trial's Optuna id, -1 before it has one
    stop: Any  # multiprocessing.Event: end the running trial at its next epoch and rerun it
    claim: repo.ClaimedSlot | None = None
    answer: str | None = None  # the slot process's answer for `claim`, or DIED, until it is settled
    settled: bool = False  # the answer's bookkeeping is committed (kept across a database outage)
    stop_deadline: float | None = None  # when a trial asked to stop gets killed instead


class Worker:
    def __init__(self, settings: Settings, slots: list[Slot], *, max_trials: int | None = None,
                 exit_when_idle: bool = False):
        self.settings = settings
        self.slots = slots
        self.max_trials = max_trials  # for tests and one-shot runs: stop after this many trials
        self.exit_when_idle = exit_when_idle
        self.engine = get_engine(settings.database_url)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.processes: dict[int, SlotProcess] = {}
        self.signals = 0
        self.trials_started = 0
        self._context = mp.get_context("spawn")
        self._last_heartbeat = 0.0
        self._last_stale_check = 0.0
        self._figures = StudyFigures(settings)
        self._nothing_to_claim = False

    @property
    def running(self) -> list[SlotProcess]:
        return [p for p in self.processes.values() if p.claim is not None]

    @property
    def stopping(self) -> bool:
        return self.signals > 0

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        with session_scope(self.engine) as session:
            repo.register_worker(session, self.id, socket.gethostname(), os.getpid(),
                                 ",".join(sorted({s.device for s in self.slots})), len(self.slots))
        for slot in self.slots:  # torch loads in the slots while the first claims are made
            self.processes[slot.index] = self._start_process(slot)
        log.info("worker %s ready with %d slot(s): %s", self.id, len(self.slots),
                 ", ".join(s.device for s in self.slots))
        try:
            while not (self.stopping and not self.running):
                self._step()
                if self._done():
                    break
                time.sleep(self.settings.worker_poll_s if not self.running else 0.1)
        finally:
            self._shutdown()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        """Signal handler: only counts; the loop does the work (see `_stop_running_trials`)."""
        self.signals += 1
        log.info("worker %s stopping (signal %d): no new trials; %d running trial(s) stop at their "
                 "epoch's end and are rerun", self.id, signum, len(self.running))

    def _done(self) -> bool:
        if self.max_trials is not None and self.trials_started >= self.max_trials and not self.running:
            return True
        return self.exit_when_idle and not self.running and self._nothing_to_claim

    def _shutdown(self) -> None:
        for p in self.processes.values():
            if p.process.is_alive():
                try:
                    p.conn.send(None)
                except OSError:
                    pass
        for p in self.processes.values():
            p.process.join(timeout=5)
            if p.process.is_alive():
                p.process.kill()
                p.process.join()
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
            if self.stopping:
                self._stop_running_trials()
            else:
                self._fill_free_slots()
            now = time.monotonic()
            if now - self._last_heartbeat >= self.settings.heartbeat_interval_s / 2:
                self._heartbeat()
                self._last_heartbeat = now
            if now - self._last_stale_check >= self.settings.grace_period_s / 2:
                self._fail_stale_trials()
                self._last_stale_check = now
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("database unavailable, retrying: %s", describe_cause(exc))
            time.sleep(min(5.0, self.settings.worker_poll_s * 5))

    def _start_process(self, slot: Slot) -> SlotProcess:
        parent_end, child_end = self._context.Pipe()
        trial_id = self._context.Value("q", -1)
        stop = self._context.Event()
        process = self._context.Process(
            target=_slot_entry,
            args=(slot.child_env(), self.settings.model_dump(), slot.trainer_device, slot.torch_threads,
                  child_end, trial_id, stop),
            name=f"converge-slot-{slot.index}",
        )
        process.start()
        child_end.close()  # so that the parent sees EOF when the child dies
        return SlotProcess(slot, process, parent_end, trial_id, stop)

    def _fill_free_slots(self) -> None:
        for slot in self.slots:
            process = self.processes.get(slot.index)
            if process is not None and process.claim is not None:
                continue
            if self.max_trials is not None and self.trials_started >= self.max_trials:
                return
            with session_scope(self.engine) as session:
                claim = repo.claim_trial_slot(session)
            if claim is None:
                self._nothing_to_claim = True
                return
            if process is None or not process.process.is_alive():
                process = self.processes[slot.index] = self._start_process(slot)
            process.trial_id.value = -1
            process.claim = claim
            try:
                process.conn.send(claim)
            except OSError:  # it died just now: reaped next step, and the unstarted slot given back
                process.answer = DIED
            self.trials_started += 1
            log.info("slot %d (%s): study %s, trial slot %d", slot.index, slot.device, claim.study_name,
                     claim.slot)

    def _stop_running_trials(self) -> None:
        """Ask each running trial to stop; a timer kills it at its deadline (reaped as an
        interruption: failed and rerun). A timer, not this loop: a frozen slot process can hold
        SQLite's write lock, and the loop's next write would wait on it for the busy timeout."""
        for p in self.running:
            if p.stop_deadline is None:
                p.stop.set()
                p.stop_deadline = time.monotonic() + self.settings.stop_timeout_s
                timer = threading.Timer(self.settings.stop_timeout_s, _kill_if_still_running, (p, p.claim))
                timer.daemon = True
                timer.start()
            if self.signals > 1:
                p.process.kill()

    def _reap(self) -> None:
        """Settle each slot whose process answered or died. The claim is kept until the database
        has taken the outcome: an outage in between retries the rest at the next step."""
        for p in self.running:
            claim = p.claim
            assert claim is not None
            if p.answer is None:
                p.answer = _answer(p)
                if p.answer is None:
                    if p.process.is_alive():
                        continue
                    p.process.join()
                    p.answer = DIED
            if not p.settled:
                self._settle_answer(p, claim)
                p.settled = True
            with session_scope(self.engine) as session:
                state = repo.finish_study_if_complete(session, claim.study_id)
            if state:
                log.info("study %s is %s", claim.study_name, state)
            self._figures.after_trial(claim.study_name, study_ended=bool(state))  # the dashboard's; never raises
            p.claim, p.answer, p.settled = None, None, False

    def _settle_answer(self, p: SlotProcess, claim: repo.ClaimedSlot) -> None:
        if p.answer == DIED:
            self._settle(p, claim, f"trial process died (exit code {p.process.exitcode})")
        elif p.answer == NOT_STARTED:
            with session_scope(self.engine) as session:
                repo.release_trial_slot(session, claim.study_id)
        elif p.answer == STORAGE_LOST:  # settled here once the database is back (this step is retried until then)
            self._settle(p, claim, "the database became unavailable during the trial (see the worker's log)")
        elif p.answer not in (TRIAL_ENDED, SETUP_FAILED):
            self._settle(p, claim, "the trial's process failed outside the trial (see the worker's log)")

    def _settle(self, p: SlotProcess, claim: repo.ClaimedSlot, cause: str) -> None:
        """The slot's trial did not end by itself: fail it and rerun it, or give its slot back."""
        trial_id = p.trial_id.value
        log.error("study %s: %s", claim.study_name, cause)
        if trial_id < 0:
            with session_scope(self.engine) as session:
                repo.release_trial_slot(session, claim.study_id)
            return
        reason = INTERRUPTED if p.stop_deadline is not None else CRASHED
        settle_dead_attempt(storage_for(self.settings), self.engine, claim.study_name, trial_id, reason, cause)

    def _heartbeat(self) -> None:
        current = []
        for p in self.running:
            assert p.claim is not None
            current.append({"study": p.claim.study_name, "slot": p.claim.slot, "device": p.slot.device,
                            "trial_id": p.trial_id.value if p.trial_id.value >= 0 else None})
        with session_scope(self.engine) as session:
            repo.heartbeat_worker(session, self.id, current, state="stopping" if self.stopping else "running")
            repo.prune_dead_workers(session, timedelta(days=1))

    def _fail_stale_trials(self) -> None:
        """Trials whose process vanished with its whole machine: Optuna's heartbeat fails them, we rerun them."""
        with session_scope(self.engine) as session:
            studies: list[Study] = repo.list_studies(session, state="running")
        storage = storage_for(self.settings)
        for study in studies:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(optuna.load_study(study_name=study.name, storage=storage))
            with session_scope(self.engine) as session:
                repo.finish_study_if_complete(session, study.id)


def _kill_if_still_running(p: SlotProcess, claim: repo.ClaimedSlot | None) -> None:
    """Timer thread: kill the slot process if it still runs the trial it was asked to stop."""
    if p.claim is claim and p.answer is None:
        p.process.kill()


def _answer(p: SlotProcess) -> str | None:
    """The slot process's answer for its claim, or None while it runs (or when it died)."""
    try:
        return p.conn.recv() if p.conn.poll() else None
    except (EOFError, OSError):
        return None


_signalled = False


def _slot_entry(env: dict[str, str], settings_data: dict[str, Any], device: str, torch_threads: int,
                conn: Connection, trial_id: Any, stop: Any) -> None:
    """Set the slot's environment before anything imports torch, then serve claims.

    SIGTERM sent to the whole process group asks the running trial to stop at its epoch's end,
    like the parent's `stop` event (a flag here: a signal handler must not take the event's lock).
    """
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the trials

    def on_sigterm(_signum: int, _frame: Any) -> None:
        global _signalled
        _signalled = True

    signal.signal(signal.SIGTERM, on_sigterm)
    slot_main(settings_data, device, torch_threads, conn, trial_id, _StopRequest(stop))


class _StopRequest:
    """The parent's stop event or this process's SIGTERM, whichever came."""

    def __init__(self, event: Any):
        self.event = event

    def is_set(self) -> bool:
        return _signalled or self.event.is_set()
