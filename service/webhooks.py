"""Schedules' webhook notifications: a JSON POST per event, delivered off the scheduler's thread.

Each notification is a `converge_webhook_deliveries` row, written (state `pending`) in the same
transaction as the run's change it reports; the `Notifier` then posts it from a small thread pool,
with a timeout per attempt and retries with a doubling backoff, recording every attempt (its HTTP
status or error, and how long it took) and the outcome (`delivered` or `failed`). A webhook that
hangs, refuses or answers 500 is logged and recorded; it never raises into, nor waits, the scheduler.

A delivery whose process stopped (a crash, a restart) stays `pending` with no new attempt: once
untouched for `stale_after_s` (twice the longest a delivery can take, plus a minute), any
scheduler takes it over (one conditional UPDATE decides which) and posts it again with a fresh
retry budget. Delivery is therefore at least once: a receiver may, rarely, see an event twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine

from service.db import schedule_repo
from service.db.engine import session_scope
from service.version import VERSION

log = logging.getLogger(__name__)

EVENTS = ("run.finished", "run.regression", "run.failed")


def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> int:
    """POST `payload` as JSON; the HTTP status (2xx), or an exception (a non-2xx status is HTTPError)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": f"converge/{VERSION}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - the schedule's own URL
        response.read(65536)
        return response.status


class Notifier:
    """Posts deliveries in the background: `submit(delivery_id, url, payload)` returns at once."""

    def __init__(self, engine: Engine, *, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 1.0,
                 threads: int = 4, post: Callable[[str, dict[str, Any], float], int] = post_json,
                 sleep: Callable[[float], None] = time.sleep):
        self.engine = engine
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._post, self._sleep = post, sleep
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="converge-webhook")
        self._futures: set[Future[str]] = set()
        self._lock = threading.Lock()

    @property
    def stale_after_s(self) -> float:
        """How long a pending delivery may go untouched before another scheduler takes it over."""
        longest = (self.retries + 1) * self.timeout_s + self.backoff_s * 2 ** self.retries
        return 2 * longest + 60

    def submit(self, delivery_id: int, url: str, payload: dict[str, Any], *, attempts_so_far: int = 0) -> Future[str]:
        """Post in the background; `attempts_so_far`: a delivery taken over continues their numbering."""
        future = self._pool.submit(self._deliver, delivery_id, url, payload, attempts_so_far)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[str]) -> None:
        with self._lock:
            self._futures.discard(future)

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for the deliveries submitted so far (tests; a graceful stop)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                return
            for future in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                future.exception(timeout=left)

    def close(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def _deliver(self, delivery_id: int, url: str, payload: dict[str, Any], attempts_so_far: int = 0) -> str:
        state = "failed"
        final = attempts_so_far + self.retries + 1
        for attempt in range(attempts_so_far + 1, final + 1):
            started = time.monotonic()
            record: dict[str, Any] = {"attempt": attempt, "at": datetime.now(timezone.utc).isoformat()}
            try:
                record["status"] = self._post(url, payload, self.timeout_s)
                ok = True
            except urllib.error.HTTPError as exc:
                record["status"], record["error"] = exc.code, f"HTTP {exc.code} {exc.reason}"
                ok = False
            except Exception as exc:  # noqa: BLE001 - any failure of the receiver is recorded, never raised
                record["error"] = f"{type(exc).__name__}: {exc}"
                ok = False
            record["seconds"] = round(time.monotonic() - started, 3)
            last = ok or attempt == final
            state = "delivered" if ok else ("failed" if last else "pending")
            self._record(delivery_id, record, state)
            if ok:
                return state
            log.warning("webhook %s (delivery %d), attempt %d of %d failed: %s", url, delivery_id, attempt,
                        final, record["error"])
            if not last:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
        log.error("webhook %s (delivery %d) given up after %d attempts", url, delivery_id, final)
        return state

    def _record(self, delivery_id: int, record: dict[str, Any], state: str) -> None:
        try:
            with session_scope(self.engine) as session:
                schedule_repo.record_attempt(session, delivery_id, record, state)
        except Exception:  # noqa: BLE001 - a database hiccup must not end the delivery thread
            log.exception("could not record webhook delivery %d", delivery_id)
