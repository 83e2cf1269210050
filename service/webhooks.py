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

A webhook goes to public addresses only, unless `CONVERGE_WEBHOOK_ALLOW` lists it (`service.outbound`, checked
at each attempt on the addresses its host resolves to then, and connected to those very addresses): a refused
one is a failed attempt, with the reason, and is not retried. Redirects are never followed: a 3xx answer is a
failed attempt with its status, as any other answer but 2xx.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine

from converge.core.db import schedule_repo
from converge.core.db.engine import session_scope
from converge.core.version import VERSION
from converge.service import outbound

log = logging.getLogger(__name__)

EVENTS = ("run.finished", "run.regression", "run.failed")


def post_json(url: str, payload: dict[str, Any], timeout_s: float, allow: outbound.Allow = outbound.PUBLIC_ONLY) -> int:
    """POST `payload` as JSON to the URL's checked addresses (`service.outbound`); the HTTP status (2xx), or an
    exception: `outbound.Refused` for a URL the address rule does not allow, HTTPError for any other status
    (a redirect included: it is not followed)."""
    target = outbound.resolve(url, allow)
    connection = outbound.open_connection(target, timeout_s)
    try:
        connection.request("POST", target.path, body=json.dumps(payload).encode(),
                           headers={"Content-Type": "application/json", "User-Agent": f"converge/{VERSION}"})
        response = connection.getresponse()
        response.read(65536)
        if not 200 <= response.status < 300:
            reason = response.reason
            if 300 <= response.status < 400:
                location = (response.getheader("Location") or "")[:200]
                reason += f": redirects are not followed{f' (to {location})' if location else ''}"
            raise urllib.error.HTTPError(url, response.status, reason, response.headers, None)
        return response.status
    finally:
        connection.close()


class Notifier:
    """Posts deliveries in the background: `submit(delivery_id, url, payload)` returns at once. `allow`: the
    non-public hosts and networks webhooks may reach (`CONVERGE_WEBHOOK_ALLOW`); by default public ones only."""

    def __init__(self, engine: Engine, *, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 1.0,
                 threads: int = 4, allow: outbound.Allow = outbound.PUBLIC_ONLY,
                 post: Callable[[str, dict[str, Any], float], int] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.engine = engine
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.allow = allow
        self._post = post or functools.partial(post_json, allow=allow)
        self._sleep = sleep
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
            refused = False
            try:
                record["status"] = self._post(url, payload, self.timeout_s)
                ok = True
            except urllib.error.HTTPError as exc:
                record["status"], record["error"] = exc.code, f"HTTP {exc.code} {exc.reason}"
                ok = False
            except outbound.Refused as exc:  # the address rule: asking again would not change the answer
                record["error"] = f"refused: {exc}"
                ok, refused = False, True
            except Exception as exc:  # noqa: BLE001 - any failure of the receiver is recorded, never raised
                record["error"] = f"{type(exc).__name__}: {exc}"
                ok = False
            record["seconds"] = round(time.monotonic() - started, 3)
            last = ok or refused or attempt == final
            state = "delivered" if ok else ("failed" if last else "pending")
            self._record(delivery_id, record, state)
            if ok:
                return state
            log.warning("webhook %s (delivery %d), attempt %d of %d failed: %s", url, delivery_id, attempt,
                        final, record["error"])
            if last:
                break
            self._sleep(self.backoff_s * 2 ** (attempt - 1))
        log.error("webhook %s (delivery %d) given up after %d attempts", url, delivery_id, attempt)
        return state

    def _record(self, delivery_id: int, record: dict[str, Any], state: str) -> None:
        try:
            with session_scope(self.engine) as session:
                schedule_repo.record_attempt(session, delivery_id, record, state)
        except Exception:  # noqa: BLE001 - a database hiccup must not end the delivery thread
            log.exception("could not record webhook delivery %d", delivery_id)
