"""The `Host` check: an open server answers only its own host names.

While no API token exists, the API and the dashboard are open to whoever reaches the port, and
`converge serve` listens on loopback for that reason. A web page can still reach it through DNS
rebinding: its own host name re-pointed at 127.0.0.1, so the browser sends `Host: evil.example`.
This pure ASGI middleware answers such a request with a 400 before any route or the dashboard
sees it. Allowed: the bound address, `localhost`, `127.0.0.1` and `::1` (with the bound port,
or without one), plus the names in `CONVERGE_ALLOWED_HOSTS`. Once a token exists the check is
off (every request then needs a token) unless `CONVERGE_ALLOWED_HOSTS` is set, which keeps it on.

Requests with an allowed `Host` cost nothing; only a foreign one asks the database whether a
token exists now (exact, so the check is back the moment the last token is revoked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio.to_thread
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SETTING = "CONVERGE_ALLOWED_HOSTS"
ALWAYS_ALLOWED = ("localhost", "127.0.0.1", "::1")


def split_host(value: str) -> tuple[str, str | None]:
    """`name[:port]` or `[v6]:port` as (lower-case name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, None  # a bare name, or an IPv6 address without brackets


class HostCheck:
    """Refuse (400) a request whose `Host` is not one of this server's names while the check applies.

    `tokens_exist`: asks the database whether an active API token exists (raising when it cannot
    tell: the request is then refused, the safe side). `always`: check whatever the tokens
    (CONVERGE_ALLOWED_HOSTS set). `port`: the bound port a `Host` with a port must name.
    """

    def __init__(self, app: ASGIApp, *, names: Iterable[str], port: int | None, always: bool,
                 tokens_exist: Callable[[], bool]):
        self.app = app
        self.names = {split_host(name)[0] for name in names if name.strip()}
        self.port = str(port) if port is not None else None
        self.always = always
        self.tokens_exist = tokens_exist

    def allowed(self, host: str) -> bool:
        name, port = split_host(host)
        return name in self.names and (port is None or self.port is None or port == self.port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
        if host is None or self.allowed(host) or (not self.always and await self._tokens_exist()):
            await self.app(scope, receive, send)
            return
        detail = (f"this server does not answer to Host {host[:100]!r}: while no API token exists it answers only "
                  f"{', '.join(sorted(self.names))}; add the name to {SETTING} if it is yours")
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)

    async def _tokens_exist(self) -> bool:
        try:
            return await anyio.to_thread.run_sync(self.tokens_exist)  # a database read: not on the event loop
        except Exception:  # noqa: BLE001 - cannot tell whether the server is open: refuse the foreign Host
            return False
