"""The request body cap: a body over `Settings.max_body_bytes` (`CONVERGE_MAX_BODY_BYTES`) is a 413.

A pure ASGI middleware, outside everything else (the dashboard included), so no route, no
dependency and not optuna-dashboard ever holds more than the limit of a request in memory:

- a `Content-Length` over the limit is answered at once, before a byte of the body is read
  (a client sending `Expect: 100-continue` never sends it);
- a body without one (chunked) is counted as the app reads it: once the bytes read pass the
  limit, reading stops there and the answer is the 413, whatever the app made of the
  interrupted body (FastAPI would call it a 400 "error parsing the body").

The 413 is JSON like every other error, `{"detail": "the request body is N bytes; the limit is
L (CONVERGE_MAX_BODY_BYTES)"}`, and closes the connection, since the rest of the body was never
read. A body that outgrows the limit after the app started its response (no route here does
that) ends the response instead.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SETTING = "CONVERGE_MAX_BODY_BYTES"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body read passes the limit; FastAPI passes HTTP errors on as they are."""

    def __init__(self, detail: str):
        super().__init__(status_code=413, detail=detail)


def too_large(size: int, limit: int, *, complete: bool = True) -> str:
    """The 413's detail: the body's size (`complete`: from Content-Length; else what was read before stopping)."""
    size_text = f"{size} bytes" if complete else f"at least {size} bytes"
    return f"the request body is {size_text}; the limit is {limit} ({SETTING})"


class BodySizeLimit:
    """ASGI middleware: refuse HTTP request bodies over `max_bytes` with a JSON 413."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(scope, receive, send, too_large(declared, self.max_bytes))
            return

        read = 0
        refusal: str | None = None  # set once the body read passed the limit
        started = False

        async def limited_receive() -> Message:
            nonlocal read, refusal
            if refusal is not None:
                raise BodyTooLarge(refusal)
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    refusal = too_large(read, self.max_bytes, complete=False)
                    raise BodyTooLarge(refusal)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None and not started:
                return  # the app's own answer to the body it was refused: the 413 goes out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None or started:
                raise
        if refusal is not None and not started:
            await _refuse(scope, receive, send, refusal)


def _content_length(scope: Scope) -> int | None:
    """The declared body size; None when absent or not a number (servers refuse those before the app)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
    await response(scope, receive, send)
