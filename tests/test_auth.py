"""API tokens: every /v1 operation and the dashboard, with no token, too low a scope, the right one and a
revoked one; the token commands; the loopback default of `converge serve`; no plaintext token anywhere.

Mostly on SQLite; the token lifecycle also runs on PostgreSQL.
"""

from __future__ import annotations

import base64
import logging
import re
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from benchmarks.scratch_db import free_port
from conftest import CLI, REPO, converge_env, tiny_spec
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.db.models import ApiToken, utcnow
from converge.core.settings import Settings
from converge.service import auth
from converge.service.api.app import create_app
from converge.service.api.deps import RequireScope

HISTORY = {"epochs": [{"epoch": 0, "train_loss": 2.3}, {"epoch": 1, "train_loss": 1.9}]}

# Every /v1 operation's scope, written down: a new route fails `test_every_v1_route_declares_its_scope`
# until it is added here, and is then tested by every case below.
SCOPE_OF = {
    ("GET", "/v1/studies"): "read",
    ("POST", "/v1/studies"): "write",
    ("GET", "/v1/studies/{name}"): "read",
    ("GET", "/v1/studies/{name}/diagnosis"): "read",
    ("GET", "/v1/studies/{name}/export"): "read",
    ("POST", "/v1/studies/{name}/cancel"): "write",
    ("GET", "/v1/studies/{name}/trials"): "read",
    ("GET", "/v1/studies/{name}/trials/{number}"): "read",
    ("GET", "/v1/studies/{name}/trials/{number}/diagnosis"): "read",
    ("GET", "/v1/studies/{name}/trials/{number}/metrics"): "read",
    ("GET", "/v1/studies/{name}/trials/{number}/artifacts"): "read",
    ("GET", "/v1/studies/{name}/artifacts/{artifact_id}"): "read",
    ("POST", "/v1/studies/{name}/trials/{number}/repair"): "write",
    ("POST", "/v1/diagnose"): "read",
    ("GET", "/v1/workers"): "read",
    ("GET", "/v1/studies/{name}/plot"): "read",
    ("GET", "/v1/studies/{name}/trials/{number}/plot"): "read",
    ("GET", "/v1/schedules"): "admin",
    ("POST", "/v1/schedules"): "admin",
    ("GET", "/v1/schedules/{schedule_id}"): "admin",
    ("PATCH", "/v1/schedules/{schedule_id}"): "admin",
    ("DELETE", "/v1/schedules/{schedule_id}"): "admin",
    ("GET", "/v1/schedules/{schedule_id}/runs"): "admin",
    ("POST", "/v1/schedules/{schedule_id}/run-now"): "admin",
}
OPEN = {("GET", "/v1/health")}


def _v1_routes() -> list[Any]:
    """Every route under /v1 as the app serves it, with its path and dependencies as included."""
    routes: list[Any] = create_app(Settings(database_url="sqlite://"), dashboard=False).routes
    try:
        from fastapi.routing import iter_route_contexts  # newer FastAPI keeps included routers nested
    except ImportError:  # older ones copy their routes into app.routes
        pass
    else:
        routes = list(iter_route_contexts(routes))
    return [r for r in routes if (getattr(r, "path", None) or "").startswith("/v1")]


OPERATIONS = sorted((method, route.path) for route in _v1_routes() for method in route.methods
                    if (method, route.path) not in OPEN)


def _request(client: TestClient, method: str, path: str, token: str | None) -> httpx.Response:
    """One call of an operation, on the study `authz` and its trial 0, with a valid body where it takes one."""
    url = path.replace("{name}", "authz").replace("{number}", "0").replace("{schedule_id}", "1")
    url = url.replace("{artifact_id}", "no-such-artifact")
    body: Any = None
    if (method, path) == ("POST", "/v1/studies"):
        body = tiny_spec(f"authz-{time.monotonic_ns()}", n_trials=1)
    elif (method, path) == ("POST", "/v1/diagnose"):
        body = HISTORY
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.request(method, url, json=body, headers=headers)


def _sqlite(tmp: Path) -> Settings:
    url = f"sqlite:///{tmp / 'auth.db'}"
    upgrade(url)
    return Settings(database_url=url)


def _engine(settings: Settings) -> sa.Engine:
    return get_engine(settings.database_url)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One SQLite database with the study `authz` and a token of each scope, one revoked."""
    settings = _sqlite(tmp_path_factory.mktemp("auth"))
    client = TestClient(create_app(settings))
    assert client.post("/v1/studies", json=tiny_spec("authz", n_trials=1)).status_code == 201  # open: no token yet
    engine = _engine(settings)
    tokens = {scope: auth.create_token(engine, scope, f"{scope}-token")[0] for scope in auth.SCOPES}
    revoked, info = auth.create_token(engine, "admin", "gone")
    auth.revoke_token(engine, info.id)
    return {"settings": settings, "client": client, "tokens": tokens, "revoked": revoked}


# ---------------------------------------------------------------- every /v1 operation


def test_every_v1_route_declares_its_scope() -> None:
    """A route without a scope dependency would be open to anyone: none but health may lack one."""
    routes = _v1_routes()
    assert len(routes) >= len(SCOPE_OF)
    for route in routes:
        dependant = getattr(route, "dependant", None)
        scopes = [d.call.scope for d in dependant.dependencies if isinstance(d.call, RequireScope)] if dependant else []
        for method in route.methods:
            if (method, route.path) in OPEN:
                assert scopes == [], f"{method} {route.path} must stay open"
            else:
                assert scopes == [SCOPE_OF.get((method, route.path))], f"{method} {route.path}: scope {scopes}"
    assert set(OPERATIONS) == set(SCOPE_OF)


def test_openapi_shows_the_bearer_scheme_and_the_auth_errors(secured: dict[str, Any]) -> None:
    spec = secured["client"].get("/openapi.json").json()  # the docs stay readable without a token
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "converge token create" in scheme["description"]
    for (method, path), scope in SCOPE_OF.items():
        operation = spec["paths"][path][method.lower()]
        assert operation["security"] == [{"bearer": []}], (method, path)
        assert {"401", "403"} <= set(operation["responses"]), (method, path)
        assert f"`{scope}`" in operation["responses"]["403"]["description"]
    assert "security" not in spec["paths"]["/v1/health"]["get"]


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_token_is_401(secured: dict[str, Any], method: str, path: str) -> None:
    response = _request(secured["client"], method, path, None)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": auth.MISSING}


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_unknown_and_revoked_tokens_are_401(secured: dict[str, Any], method: str, path: str) -> None:
    unknown = _request(secured["client"], method, path, auth.new_token())
    assert unknown.status_code == 401 and unknown.json() == {"detail": "unknown API token"}
    assert unknown.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    revoked = _request(secured["client"], method, path, secured["revoked"])
    assert revoked.status_code == 401
    assert revoked.json() == {"detail": f"API token {secured['revoked'][:12]}… was revoked"}


@pytest.mark.parametrize("method, path", [op for op in OPERATIONS if SCOPE_OF[op] != "read"])
def test_too_low_a_scope_is_403_naming_the_scope_needed(secured: dict[str, Any], method: str, path: str) -> None:
    needed = SCOPE_OF[(method, path)]
    for lower in auth.SCOPES[:auth.SCOPES.index(needed)]:
        response = _request(secured["client"], method, path, secured["tokens"][lower])
        assert response.status_code == 403, response.text
        detail = response.json()["detail"]
        assert f"needs a token of scope {needed!r}" in detail and f"has scope {lower!r}" in detail
        assert response.headers["www-authenticate"] == f'Bearer error="insufficient_scope", scope="{needed}"'


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_the_right_scope_and_higher_pass(secured: dict[str, Any], method: str, path: str) -> None:
    needed = SCOPE_OF[(method, path)]
    for scope in auth.SCOPES[auth.SCOPES.index(needed):]:
        response = _request(secured["client"], method, path, secured["tokens"][scope])
        assert response.status_code not in (401, 403), (scope, response.text)
        assert response.status_code < 500, response.text


def test_health_and_the_docs_stay_open(secured: dict[str, Any]) -> None:
    client = secured["client"]
    assert client.get("/v1/health").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/studies", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 401


def test_a_body_that_is_not_json_is_a_422_before_the_token_is_checked(secured: dict[str, Any]) -> None:
    """FastAPI parses the body before running dependencies (docs/architecture.md says so); it reveals nothing."""
    response = secured["client"].post("/v1/studies", content="not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["detail"]
    assert secured["client"].post("/v1/studies", json={"n_trials": 0}).status_code == 401  # JSON: token first


# ---------------------------------------------------------------- the dashboard


def _basic(token: str, user: str = "me") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


def test_dashboard_reads_need_a_read_token(secured: dict[str, Any]) -> None:
    client, tokens = secured["client"], secured["tokens"]
    for path in ("/dashboard", "/api/studies", "/api/meta", "/favicon.ico", "/csv/1"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == 'Basic realm="Converge dashboard", charset="UTF-8"'
        assert "log in with an API token as the password" in refused.json()["detail"]
    page = client.get("/dashboard", headers=_basic(tokens["read"]))
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/dashboard", headers=_basic("", user=tokens["read"])).status_code == 200  # token as user
    studies = client.get("/api/studies", headers={"Authorization": f"Bearer {tokens['read']}"})
    assert studies.status_code == 200 and "authz" in [s["study_name"] for s in studies.json()["study_summaries"]]
    assert client.head("/dashboard", headers=_basic(tokens["read"])).status_code != 401
    for bad in (_basic(auth.new_token()), _basic(secured["revoked"]), {"Authorization": "Basic not-base64!"},
                {"Authorization": "Digest x"}):
        assert client.get("/dashboard", headers=bad).status_code == 401, bad


def test_dashboard_changes_need_an_admin_token(secured: dict[str, Any]) -> None:
    client, tokens = secured["client"], secured["tokens"]
    changes = [("POST", "/api/studies"), ("DELETE", "/api/studies/1"), ("POST", "/api/trials/1/tell"),
               ("PUT", "/api/studies/1/note"), ("POST", "/artifacts/1/1"), ("DELETE", "/artifacts/1/1/x")]
    for method, path in changes:
        assert client.request(method, path).status_code == 401, path
        for scope in ("read", "write"):
            refused = client.request(method, path, headers=_basic(tokens[scope]))
            assert refused.status_code == 403, (scope, method, path)
            assert "needs a token of scope 'admin'" in refused.json()["detail"]
    # An admin token reaches optuna-dashboard, which answers for itself (here: a body without a study name).
    allowed = client.post("/api/studies", json={}, headers=_basic(tokens["admin"]))
    assert allowed.status_code == 400 and "study_name" in allowed.json()["reason"]


# ---------------------------------------------------------------- on, off, and what each request reads


def test_open_while_no_token_exists_and_closed_from_the_first_one(tmp_path: Path) -> None:
    settings = _sqlite(tmp_path)
    replica_a, replica_b = TestClient(create_app(settings)), TestClient(create_app(settings))
    assert replica_a.get("/v1/studies").status_code == 200
    assert replica_a.get("/dashboard").status_code == 200
    ignored = {"Authorization": f"Bearer {auth.new_token()}"}  # no token exists: a token sent is ignored
    assert replica_a.post("/v1/studies", json=tiny_spec("open"), headers=ignored).status_code == 201

    token, info = auth.create_token(_engine(settings), "read")
    for replica in (replica_a, replica_b):  # no cache: both see the new token at their next request
        assert replica.get("/v1/studies").status_code == 401
        assert replica.get("/dashboard").status_code == 401
        assert replica.get("/v1/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    auth.revoke_token(_engine(settings), info.id)
    assert replica_b.get("/v1/studies").status_code == 200  # the last token revoked: open again


def test_a_server_that_requires_tokens_stays_closed_without_any(tmp_path: Path) -> None:
    client = TestClient(create_app(_sqlite(tmp_path), require_token=True))
    assert client.get("/v1/studies").status_code == 401
    assert client.get("/dashboard").status_code == 401
    assert client.get("/v1/health").status_code == 200


def test_token_lifecycle(settings: Settings) -> None:
    """On SQLite and PostgreSQL: create, use, too low a scope, `last_used_at`, revoke."""
    engine = _engine(settings)
    client = TestClient(create_app(settings))
    token, info = auth.create_token(engine, "write", "lifecycle")
    assert token.startswith("cvg_") and len(token) == 4 + 43 and info.prefix == token[:12]
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.post("/v1/studies", json=tiny_spec("life"), headers=bearer).status_code == 201
    assert client.get("/v1/studies", headers=bearer).json()[0]["name"] == "life"
    assert client.post("/api/studies", json={}, headers=bearer).status_code == 403  # the dashboard wants admin
    (listed,) = auth.list_tokens(engine)
    assert listed.last_used_at is not None and listed.revoked_at is None

    _, revoked_now, left = auth.revoke_token(engine, info.id)
    assert revoked_now and not left
    auth.create_token(engine, "read")  # another token keeps authentication on
    assert client.get("/v1/studies", headers=bearer).status_code == 401
    assert auth.revoke_token(engine, info.id)[1] is False  # revoking twice changes nothing


def test_last_used_is_written_at_most_once_a_minute(tmp_path: Path) -> None:
    settings = _sqlite(tmp_path)
    engine = _engine(settings)
    client = TestClient(create_app(settings, dashboard=False))
    token, info = auth.create_token(engine, "read")

    def last_used() -> Any:
        with session_scope(engine) as session:
            return session.get(ApiToken, info.id).last_used_at

    def set_last_used(ago: timedelta) -> Any:
        with session_scope(engine) as session:
            session.get(ApiToken, info.id).last_used_at = utcnow() - ago
        return last_used()

    assert last_used() is None
    assert client.get("/v1/workers", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    first = last_used()
    assert first is not None
    recent = set_last_used(timedelta(seconds=30))
    client.get("/v1/workers", headers={"Authorization": f"Bearer {token}"})
    assert last_used() == recent  # within the minute: no write
    old = set_last_used(timedelta(seconds=61))
    client.get("/v1/workers", headers={"Authorization": f"Bearer {token}"})
    assert last_used() > old


def test_an_unreachable_database_is_503_not_401() -> None:
    client = TestClient(create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none")))
    for path in ("/v1/studies", "/dashboard"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert "cannot use database" in response.json()["detail"]


# ---------------------------------------------------------------- no plaintext token, stored or logged


def test_tokens_are_never_stored_or_logged_in_plaintext(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")  # every statement and its parameters
    settings = _sqlite(tmp_path)
    engine = _engine(settings)
    client = TestClient(create_app(settings))
    made = {scope: auth.create_token(engine, scope, f"{scope} label") for scope in auth.SCOPES}
    tokens = [token for token, _ in made.values()]
    for token in tokens:
        client.get("/v1/studies", headers={"Authorization": f"Bearer {token}"})
        client.post("/v1/studies", json=tiny_spec("x"), headers={"Authorization": f"Bearer {token}"})
        client.post("/api/studies", json={}, headers=_basic(token))
    auth.revoke_token(engine, made["read"][1].id)
    client.get("/v1/studies", headers={"Authorization": f"Bearer {made['read'][0]}"})  # revoked: logged
    auth.list_tokens(engine)

    with engine.connect() as conn:
        dump = "\n".join(str(row) for table in sa.inspect(conn).get_table_names()
                         for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')))
    assert auth.hash_token(tokens[0]) in dump  # the dump does see the tokens' rows
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "revoked API token" in logged and "SELECT" in logged  # the logs did capture these requests
    for token in tokens:
        assert token not in dump
        assert token[12:] not in dump and token[12:] not in logged  # at most the 12-character prefix
        assert token not in logged


# ---------------------------------------------------------------- `converge token ...` and `converge serve`


def converge(db_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, env=converge_env(db_url),
                          capture_output=True, text=True, timeout=timeout)


def test_token_commands(tmp_path: Path) -> None:
    settings = _sqlite(tmp_path)
    url = settings.database_url
    assert "no API tokens" in converge(url, "token", "list").stdout

    created = converge(url, "token", "create", "--scope", "write", "--name", "ci")
    assert created.returncode == 0, created.stderr
    (token,) = created.stdout.splitlines()  # the token alone on stdout, once
    assert re.fullmatch(r"cvg_[A-Za-z0-9_-]{43}", token)
    assert "it cannot be shown again" in created.stderr and "authentication is now on" in created.stderr

    listed = converge(url, "token", "list")
    assert token not in listed.stdout + listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["id", "name", "scope", "prefix", "created", "last", "used", "revoked"]
    assert row.split()[:4] == ["1", "ci", "write", f"{token[:12]}..."]

    client = TestClient(create_app(settings))
    assert client.get("/v1/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    revoked = converge(url, "token", "revoke", "1")
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"token 1 ({token[:12]}...) revoked"
    assert "no active token is left" in revoked.stderr
    converge_token = converge(url, "token", "create", "--scope", "read").stdout.strip()
    assert client.get("/v1/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert client.get("/v1/studies", headers={"Authorization": f"Bearer {converge_token}"}).status_code == 200

    unknown = converge(url, "token", "revoke", "99")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "converge: no API token with id 99 (`converge token list` shows them)"
    bad_scope = converge(url, "token", "create", "--scope", "root")
    assert bad_scope.returncode == 2 and "'root' is not one of 'read', 'write', 'admin'" in bad_scope.stderr


def test_the_cli_offers_exactly_the_scopes() -> None:
    from converge.service.cli import token_create

    (scope,) = [p for p in token_create.params if p.name == "scope"]
    assert tuple(scope.type.choices) == auth.SCOPES


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("example.org", False),
    ("", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def test_serve_refuses_a_public_host_while_no_token_exists(tmp_path: Path) -> None:
    url = _sqlite(tmp_path).database_url
    refused = converge(url, "serve", "--host", "0.0.0.0", "--port", "1", "--workers", "0")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "converge: refusing to listen on 0.0.0.0: no API token exists, so the API and the dashboard would be open "
        "to anyone who can reach it. Create one first with `converge token create --scope admin`, or bind to "
        "127.0.0.1.")
    assert "Uvicorn running" not in refused.stdout + refused.stderr


def test_serve_on_a_public_host_requires_a_token_even_after_the_last_is_revoked(tmp_path: Path) -> None:
    settings = _sqlite(tmp_path)
    token, info = auth.create_token(_engine(settings), "read")
    port = free_port()
    server = subprocess.Popen([*CLI, "serve", "--host", "0.0.0.0", "--port", str(port),
                               "--workers", "0"], cwd=REPO, env=converge_env(settings.database_url),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{base}/v1/studies").status_code == 401
        assert httpx.get(f"{base}/v1/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        auth.revoke_token(_engine(settings), info.id)
        assert httpx.get(f"{base}/v1/studies").status_code == 401  # not open, though no token is left
        assert httpx.get(f"{base}/dashboard").status_code == 401
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert token not in output  # the access log shows paths, never the header
