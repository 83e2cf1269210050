"""API tokens: making them, hashing them, their scopes, and the check every request goes through.

A token is `cvg_` followed by `secrets.token_urlsafe(32)` (256 random bits). The database keeps
its SHA-256 and its first 12 characters (`prefix`, for lists and logs), never the token itself:
it is shown once, by `converge token create`.

Scopes are ordered: `admin` includes `write`, which includes `read`.

Authentication is on while at least one token that is not revoked exists; with none the API and
the dashboard are open (and `converge serve` binds to loopback only, or is told to require a
token). The check reads the database on every request, with no cache: the database is the only
state API replicas share, so a token created or revoked anywhere holds at the next request on
every replica. It costs one indexed lookup by hash (a second, "is any token active", only when
that lookup finds no active token), plus an update of `last_used_at` at most once a minute per
token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from converge.core.db import repo
from converge.core.db.engine import session_scope
from converge.core.db.models import API_SCOPES, ApiToken, utcnow
from converge.core.errors import SchemaNotReady, ServiceError

log = logging.getLogger("converge.auth")

SCOPES = API_SCOPES  # ("read", "write", "admin"): each includes the ones before it
TOKEN_PREFIX = "cvg_"
PREFIX_CHARS = 12  # what `converge token list` and the logs show of a token
LAST_USED_EVERY = timedelta(minutes=1)  # `last_used_at` is written at most this often per token

MISSING = ("authentication required: send an API token as `Authorization: Bearer TOKEN` "
           "(`converge token create` makes one)")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 of the whole token, in hex: what the database stores and looks tokens up by.

    A fast, unsalted hash is the right one here, and a password hash (bcrypt, scrypt, argon2)
    would not be: salts and slow hashes exist to make guessing a low-entropy secret from its
    stolen hash expensive, but a token is 256 random bits, beyond any guessing, so a fast hash
    gives nothing away. Unsalted, the hash is also the lookup key: one indexed query per request
    instead of trying every stored token.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def allows(have: str, need: str) -> bool:
    """Whether a token of scope `have` may do what needs `need`."""
    return SCOPES.index(have) >= SCOPES.index(need)


@dataclass(frozen=True)
class TokenInfo:
    """A token as the service shows it: never the token itself."""

    id: int
    name: str | None
    scope: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(row.id, row.name, row.scope, row.prefix, row.created_at, row.last_used_at, row.revoked_at)


class AuthError(Exception):
    """A request refused: 401 (no token, an unknown or a revoked one) or 403 (scope too low)."""

    def __init__(self, status: int, detail: str, *, needed: str | None = None, token_sent: bool = False):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.needed = needed  # the scope needed, on a 403
        self.token_sent = token_sent


def authorize(engine: Engine, token: str | None, needed: str, *, required: bool = False) -> TokenInfo | None:
    """Check that `token` may do what needs scope `needed`.

    Returns the token's `TokenInfo`, or None when authentication is off (no active token and not
    `required`; a token sent then is ignored). Raises `AuthError`: 401 when no token was sent or
    it is unknown or revoked, 403 when its scope is below `needed`; database errors surface as
    `DatabaseUnavailable` / `SchemaNotReady` like everywhere else, except that a database without
    Converge's tables holds no token, so it leaves authentication off unless `required` (that
    keeps `POST /v1/diagnose`, which needs no database, working before `converge db upgrade`).
    """
    digest = hash_token(token) if token else None
    try:
        return _authorize(engine, token, digest, needed, required)
    except SchemaNotReady:
        if required:
            raise
        return None  # a database `converge db upgrade` never made holds no token: as with none, open


def _authorize(engine: Engine, token: str | None, digest: str | None, needed: str, required: bool) -> TokenInfo | None:
    with session_scope(engine) as session:
        row = repo.find_api_token(session, digest) if digest else None
        # The database compared already; this also refuses a match found by a lenient collation.
        if row is not None and not hmac.compare_digest(row.token_hash, digest or ""):
            row = None
        if row is None or row.revoked_at is not None:
            if not required and not repo.any_active_api_token(session):
                return None
            if token is None:
                raise AuthError(401, MISSING)
            if row is None:
                log.info("refused a request with an unknown API token")
                raise AuthError(401, "unknown API token", token_sent=True)
            log.warning("refused a request with revoked API token %s (id %d)", row.prefix, row.id)
            raise AuthError(401, f"API token {row.prefix}… was revoked", token_sent=True)
        info = TokenInfo.of(row)
    now = utcnow()
    if info.last_used_at is None or now - info.last_used_at >= LAST_USED_EVERY:
        _record_use(engine, info, now)
    if not allows(info.scope, needed):
        raise AuthError(403, f"this needs a token of scope {needed!r} or higher; token {info.prefix}… has scope "
                             f"{info.scope!r}", needed=needed, token_sent=True)
    return info


def _record_use(engine: Engine, info: TokenInfo, now: datetime) -> None:
    """Best effort: a request never fails because its token's `last_used_at` could not be written."""
    try:
        with session_scope(engine) as session:
            repo.touch_api_token(session, info.id, now)
    except (ServiceError, SQLAlchemyError) as exc:
        log.warning("could not record the use of API token %s (id %d): %s", info.prefix, info.id,
                    type(exc).__name__)


def auth_enabled(engine: Engine) -> bool:
    with session_scope(engine) as session:
        return repo.any_active_api_token(session)


# ---------------------------------------------------------------- credentials from headers


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, else None."""
    scheme, _, value = (authorization or "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def bearer_or_basic_token(authorization: str | None) -> str | None:
    """The token of a Bearer header, or of HTTP Basic auth: the password, any user name (the user
    name itself when the password is empty, for people who paste the token in the wrong box)."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        return bearer_token(authorization)
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password or user or None


# ---------------------------------------------------------------- managing tokens (`converge token ...`)


def create_token(engine: Engine, scope: str, name: str | None = None) -> tuple[str, TokenInfo]:
    """A new token and its stored form; the token is returned here once and stored nowhere."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
    token = new_token()
    with session_scope(engine) as session:
        row = repo.add_api_token(session, name=name, scope=scope, token_hash=hash_token(token),
                                 prefix=token[:PREFIX_CHARS])
        info = TokenInfo.of(row)
    log.info("created API token %s (id %d, scope %s)", info.prefix, info.id, info.scope)
    return token, info


def list_tokens(engine: Engine) -> list[TokenInfo]:
    with session_scope(engine) as session:
        return [TokenInfo.of(row) for row in repo.list_api_tokens(session)]


def revoke_token(engine: Engine, token_id: int) -> tuple[TokenInfo, bool, bool]:
    """Revoke a token: (the token, whether it was active until now, whether any active token is left).

    `NotFound` for an unknown id; revoking a revoked token changes nothing.
    """
    with session_scope(engine) as session:
        row, revoked_now = repo.revoke_api_token(session, token_id)
        info = TokenInfo.of(row)
        left = repo.any_active_api_token(session)
    if revoked_now:
        log.info("revoked API token %s (id %d)", info.prefix, info.id)
    return info, revoked_now, left


# ---------------------------------------------------------------- the secure default


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine: 127.0.0.0/8, ::1 or localhost."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # another host name: it may resolve to anything
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)
