"""Webhooks go to public addresses only (service/outbound.py): a loopback, private, link-local... URL is refused
when a schedule is created or changed (REST 422, CLI exit 2) and again at each delivery, on the addresses its
host resolves to then, connecting to those very addresses; `CONVERGE_WEBHOOK_ALLOW` lets hosts and networks
through. Redirects are never followed. Real HTTP: listeners on 127.0.0.1 in threads, one of them redirecting
to another; no request leaves the machine."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import urllib.error
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from conftest import tiny_spec
from converge.core.db import schedule_repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.settings import Settings, get_settings
from converge.service import outbound, schedules
from converge.service.api.app import create_app
from converge.service.outbound import Allow, Refused
from converge.service.scheduler import Scheduler
from converge.service.webhooks import post_json

ALLOW_SETTING = "CONVERGE_WEBHOOK_ALLOW"
PUBLIC = "93.184.216.34"  # a public literal address: checked here, never posted to (no internet)


class Listener:
    """A local HTTP receiver recording every request; answers `status`, with `location` when given."""

    def __init__(self, status: int = 200, location: str | None = None):
        self.status, self.location = status, location
        self.hits: list[dict[str, Any]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                listener.hits.append({"method": self.command, "path": self.path, "host": self.headers["Host"],
                                      "body": json.loads(body) if body else None})
                self.send_response(listener.status)
                if listener.location:
                    self.send_header("Location", listener.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _answer  # noqa: N815 - http.server's names; a followed redirect may be a GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    one = Listener()
    yield one
    one.close()


@pytest.fixture
def redirector(listener: Listener) -> Iterator[Listener]:
    """Answers 302 to `listener` (another local port)."""
    one = Listener(302, location=listener.url)
    yield one
    one.close()


@pytest.fixture
def strict(settings: Settings) -> Settings:
    """The default: CONVERGE_WEBHOOK_ALLOW empty, public addresses only."""
    return settings.model_copy(update={"webhook_allow": ""})


# ---------------------------------------------------------------- the address classifier


@pytest.mark.parametrize(("address", "why"), [
    ("93.184.216.34", None),
    ("8.8.8.8", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),  # IPv4-mapped public: it is 8.8.8.8
    ("64:ff9b::808:808", None),  # NAT64 of a public address (DNS64 answers these)
    ("2002:808:808::1", None),  # 6to4 of a public address
    ("127.0.0.1", "a loopback address"),
    ("127.255.0.9", "a loopback address"),
    ("::1", "a loopback address"),
    ("169.254.169.254", "a link-local address"),  # cloud metadata
    ("fe80::1", "a link-local address"),
    ("10.1.2.3", "a private address"),
    ("172.16.0.1", "a private address"),
    ("192.168.1.1", "a private address"),
    ("fd00::1", "a private address"),
    ("100.64.0.1", "not a globally reachable address"),  # carrier-grade NAT
    ("0.0.0.0", "an unspecified address"),
    ("::", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("224.0.1.1", "a multicast address"),  # globally scoped, still no webhook target
    ("ff02::1", "a multicast address"),
    ("240.0.0.1", "a reserved address"),
    ("255.255.255.255", "a reserved address"),
    ("::7f00:1", "a reserved address"),  # the deprecated IPv4-compatible form
    ("::ffff:127.0.0.1", "the IPv4-mapped form of 127.0.0.1, a loopback address"),
    ("::ffff:169.254.169.254", "the IPv4-mapped form of 169.254.169.254, a link-local address"),
    ("::ffff:10.0.0.1", "the IPv4-mapped form of 10.0.0.1, a private address"),
    ("64:ff9b::7f00:1", "the NAT64 form of 127.0.0.1, a loopback address"),
    ("2002:7f00:1::", "the 6to4 form of 127.0.0.1, a loopback address"),
    ("2002:a00:1::", "the 6to4 form of 10.0.0.1, a private address"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "the Teredo form of 127.0.0.1, a loopback address"),
])
def test_address_classifier(address: str, why: str | None) -> None:
    assert outbound.not_public(ipaddress.ip_address(address)) == why


def test_allow_list_by_host_name_and_network() -> None:
    allow = Allow.from_setting(" 127.0.0.1, 10.0.0.0/8 ,Hooks.LAN., [::1], fd00::/8,, 10.0.0.0/33")
    loopback, lan = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.9.8.7")
    assert allow.permits("anything", loopback) and allow.permits("x", lan)
    assert allow.permits("x", ipaddress.ip_address("::ffff:127.0.0.1"))  # the IPv4 address it stands for
    assert allow.permits("x", ipaddress.ip_address("::1")) and allow.permits("x", ipaddress.ip_address("fd00::5"))
    assert allow.permits("hooks.lan", ipaddress.ip_address("192.168.0.1"))  # a listed name: any of its addresses
    assert allow.permits("HOOKS.lan.", ipaddress.ip_address("192.168.0.1"))
    assert not allow.permits("other.lan", ipaddress.ip_address("192.168.0.1"))
    assert not allow.permits("x", ipaddress.ip_address("127.0.0.2"))
    assert not Allow.from_setting("").permits("localhost", loopback)
    assert "10.0.0.0/33" in allow.hosts  # not a network: a host name that matches nothing, so it allows nothing


@pytest.mark.parametrize(("url", "words"), [
    ("ftp://example.com/x", "scheme 'ftp' is not allowed"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher' is not allowed"),
    ("http:///hook", "has no host"),
    ("http://127.0.0.1:99999/hook", "bad port"),
    ("http://127.0.0.1/hook", "127.0.0.1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]:8080/", "::ffff:127.0.0.1 is the IPv4-mapped form of 127.0.0.1, a loopback address"),
    ("http://localhost:8080/hook", "localhost resolves to 127.0.0.1, a loopback address"),
    ("http://127.1/hook", "127.1 resolves to 127.0.0.1, a loopback address"),  # what the resolver makes of it
    ("http://2130706433/hook", "2130706433 resolves to 127.0.0.1, a loopback address"),
    ("http://0x7f000001/hook", "0x7f000001 resolves to 127.0.0.1, a loopback address"),
    ("http://user@127.0.0.1@93.184.216.34/", None),  # the host is what follows the last @, and is checked
])
def test_resolve_refuses_with_the_reason(url: str, words: str | None) -> None:
    if words is None:
        assert outbound.resolve(url, outbound.PUBLIC_ONLY).addresses == (ipaddress.ip_address(PUBLIC),)
        return
    with pytest.raises(Refused, match=words):
        outbound.resolve(url, outbound.PUBLIC_ONLY)


class FakeDNS:
    """socket.getaddrinfo answering `answers[name]` (one list per lookup, the last one repeated); other names as
    usual. Counts the lookups of each name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **answers: list[list[str]]):
        self.answers, self.lookups = answers, {name: 0 for name in answers}
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host not in self.answers:
                return real(host, port, *args, **kwargs)
            self.lookups[host] += 1
            addresses = self.answers[host][min(self.lookups[host], len(self.answers[host])) - 1]
            if not addresses:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_every_resolved_address_must_be_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeDNS(monkeypatch, **{"mixed.example": [[PUBLIC, "127.0.0.1"]], "public.example": [[PUBLIC, "2606:4700::1"]]})
    with pytest.raises(Refused, match="mixed.example resolves to 127.0.0.1, a loopback address"):
        outbound.resolve("https://mixed.example/hook", outbound.PUBLIC_ONLY)
    target = outbound.resolve("https://public.example/a/b?c=1", outbound.PUBLIC_ONLY)
    assert (target.host, target.port, target.path) == ("public.example", 443, "/a/b?c=1")
    assert [str(a) for a in target.addresses] == [PUBLIC, "2606:4700::1"]


# ---------------------------------------------------------------- at create and change: REST and CLI


BAD_URLS = [
    ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
    ("http://[::1]/hook", "::1 is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
    ("http://[::ffff:127.0.0.1]:8080/hook", "the IPv4-mapped form of 127.0.0.1, a loopback address"),
    ("http://localhost:8080/hook", "localhost resolves to 127.0.0.1, a loopback address"),
    ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ("ftp://example.com/hook", "must be an http:// or https:// URL"),
]


def body(**fields: Any) -> dict[str, Any]:
    return {"cron": "30 2 * * *", "template": tiny_spec("hooked"), **fields}


@pytest.mark.parametrize(("url", "words"), BAD_URLS)
def test_create_and_patch_refuse_a_non_public_webhook(strict: Settings, url: str, words: str) -> None:
    client = TestClient(create_app(strict, dashboard=False))
    created = client.post("/v1/schedules", json=body(webhook_url=url))
    assert created.status_code == 422, created.text
    detail, problems = created.json()["detail"], created.json()["problems"]
    assert words in detail and "webhook_url" in detail and len(problems) == 1 and problems[0].startswith("webhook_url:")
    if url.startswith("http"):
        assert ALLOW_SETTING in detail  # it names the setting that would let it through
    assert client.get("/v1/schedules").json() == []

    sid = client.post("/v1/schedules", json=body()).json()["id"]
    patched = client.patch(f"/v1/schedules/{sid}", json={"webhook_url": url})
    assert patched.status_code == 422, patched.text
    assert words in patched.json()["detail"] and "webhook_url" in patched.json()["detail"]
    assert client.get(f"/v1/schedules/{sid}").json()["webhook_url"] is None


def test_public_address_passes_and_the_allow_setting_lets_listed_ones_through(strict: Settings) -> None:
    client = TestClient(create_app(strict, dashboard=False))
    made = client.post("/v1/schedules", json=body(webhook_url=f"http://{PUBLIC}/hook"))
    assert made.status_code == 201, made.text
    changed = client.patch(f"/v1/schedules/{made.json()['id']}", json={"webhook_url": f"https://{PUBLIC}:8443/x"})
    assert changed.status_code == 200 and changed.json()["webhook_url"] == f"https://{PUBLIC}:8443/x"
    assert client.patch(f"/v1/schedules/{made.json()['id']}", json={"webhook_url": None}).status_code == 200

    allowing = TestClient(create_app(strict.model_copy(update={"webhook_allow": "127.0.0.1,10.0.0.0/8"}),
                                     dashboard=False))
    for url in ("http://127.0.0.1:8080/hook", "http://localhost:8080/hook", "http://[::ffff:127.0.0.1]/hook",
                "http://10.1.2.3/hook"):
        assert allowing.post("/v1/schedules", json=body(webhook_url=url)).status_code == 201, url
    for url in ("http://[::1]/hook", "http://169.254.169.254/", "http://192.168.0.1/"):  # not listed
        assert allowing.post("/v1/schedules", json=body(webhook_url=url)).status_code == 422, url


def test_a_name_that_does_not_resolve_yet_is_left_to_the_delivery_check(
        strict: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeDNS(monkeypatch, **{"hooks.not-yet.example": [[]]})
    client = TestClient(create_app(strict, dashboard=False))
    assert client.post("/v1/schedules", json=body(webhook_url="http://hooks.not-yet.example/")).status_code == 201


def test_cli_schedule_create_refuses_with_exit_2(settings: Settings, tmp_path: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from converge.service.cli import cli

    monkeypatch.setenv("CONVERGE_DATABASE_URL", settings.database_url)
    monkeypatch.delenv(ALLOW_SETTING, raising=False)
    get_settings.cache_clear()
    try:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(tiny_spec("clihook")))
        runner = CliRunner()
        args = ["schedule", "create", "--cron", "30 2 * * *", "--spec", str(spec)]
        bad = runner.invoke(cli, [*args, "--webhook", "http://169.254.169.254/latest"])
        assert bad.exit_code == 2, bad.output
        assert "  - webhook_url: 169.254.169.254 is a link-local address" in bad.output
        assert ALLOW_SETTING in bad.output
        both = runner.invoke(cli, ["schedule", "create", "--cron", "99 * * * *", "--spec", str(spec),
                                   "--webhook", "http://[::1]:8080/hook"])
        assert both.exit_code == 2 and "(2 problems)" in both.output  # one line per problem, all at once
        assert "'99 * * * *'" in both.output and "  - webhook_url: ::1 is a loopback address" in both.output
        scheme = runner.invoke(cli, [*args, "--webhook", "ftp://example.com/x"])
        assert scheme.exit_code == 2 and "http:// or https://" in scheme.output
        assert "no schedules" in runner.invoke(cli, ["schedule", "list"]).output

        monkeypatch.setenv(ALLOW_SETTING, "127.0.0.1")
        get_settings.cache_clear()
        made = runner.invoke(cli, [*args, "--webhook", "http://127.0.0.1:8080/hook"])
        assert made.exit_code == 0, made.output
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------- at delivery


def delivered_by_scheduler(settings: Settings, url: str) -> dict[str, Any]:
    """Run a schedule with that webhook once (its template no longer starts, so the run fails and notifies
    run.failed) with the scheduler `converge serve` would build from `settings`; its one delivery's record."""
    engine = get_engine(settings.database_url)
    data = schedules.ScheduleIn.model_validate(body(webhook_url=url))
    with session_scope(engine) as session:  # stored as a schedule made before the rule, or under another setting
        sid = schedules.create_schedule(session, data, allow=Allow.from_setting("127.0.0.1")).id
        schedule_repo.get_schedule(session, sid).template = {**tiny_spec("hooked"), "n_trials": 0}
    scheduler = Scheduler(settings)
    try:
        run_id = scheduler.run_now(sid)
        scheduler.notifier.wait(20)
        scheduler.tick()  # and the scheduler goes on
    finally:
        scheduler.stop()
    with session_scope(engine) as session:
        (delivery,) = schedule_repo.deliveries_of_runs(session, [run_id])
        return {"state": delivery.state, "event": delivery.event, "attempts": list(delivery.attempts)}


def env_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch, allow: str | None) -> Settings:
    """Settings as a process reads them, with CONVERGE_WEBHOOK_ALLOW set to `allow` (None: unset)."""
    if allow is None:
        monkeypatch.delenv(ALLOW_SETTING, raising=False)
    else:
        monkeypatch.setenv(ALLOW_SETTING, allow)
    return Settings(database_url=settings.database_url, webhook_timeout_s=2, webhook_retries=1,
                    webhook_backoff_s=0.01)


def test_delivery_to_a_local_listener_is_refused_unless_allowed(
        settings: Settings, listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = delivered_by_scheduler(env_settings(settings, monkeypatch, None), listener.url)
    assert refused["state"] == "failed" and refused["event"] == "run.failed"
    (attempt,) = refused["attempts"]  # refused once, not retried: asking again would not change the answer
    assert "status" not in attempt
    assert attempt["error"].startswith("refused: 127.0.0.1 is a loopback address") and ALLOW_SETTING in attempt["error"]
    assert listener.hits == []

    allowed = delivered_by_scheduler(env_settings(settings, monkeypatch, "127.0.0.1"), listener.url)
    assert allowed["state"] == "delivered" and [a["status"] for a in allowed["attempts"]] == [200]
    (hit,) = listener.hits
    assert (hit["method"], hit["path"], hit["body"]["event"]) == ("POST", "/hook", "run.failed")


def test_a_redirect_is_a_failed_attempt_and_never_followed(
        settings: Settings, listener: Listener, redirector: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    delivery = delivered_by_scheduler(env_settings(settings, monkeypatch, "127.0.0.1"), redirector.url)
    assert delivery["state"] == "failed"
    assert [a["attempt"] for a in delivery["attempts"]] == [1, 2]  # retried as any other failing answer
    for attempt in delivery["attempts"]:
        assert attempt["status"] == 302
        assert attempt["error"] == f"HTTP 302 Found: redirects are not followed (to {listener.url})"
    assert len(redirector.hits) == 2 and listener.hits == []


@pytest.mark.parametrize("status", [301, 303, 307, 308])
def test_no_redirect_status_is_followed(status: int, listener: Listener) -> None:
    redirecting = Listener(status, location=listener.url)
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            post_json(redirecting.url, {"event": "x"}, 2.0, allow=Allow.from_setting("127.0.0.1"))
        assert info.value.code == status and "redirects are not followed" in str(info.value.reason)
    finally:
        redirecting.close()
    assert len(redirecting.hits) == 1 and listener.hits == []


def test_the_connection_goes_to_the_address_that_was_checked(
        listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    # A name allowed by name, resolving to the listener: posted there, with the name in Host, resolved once.
    dns = FakeDNS(monkeypatch, **{"hooks.lan": [["127.0.0.1"]]})
    url = f"http://hooks.lan:{listener.port}/hook?x=1"
    assert post_json(url, {"event": "x"}, 2.0, allow=Allow.from_setting("hooks.lan")) == 200
    assert [(h["host"], h["path"]) for h in listener.hits] == [(f"hooks.lan:{listener.port}", "/hook?x=1")]
    assert dns.lookups == {"hooks.lan": 1}
    with pytest.raises(Refused, match="hooks.lan resolves to 127.0.0.1, a loopback address"):
        post_json(url, {"event": "x"}, 2.0)  # not allowed: refused before any connection
    assert len(listener.hits) == 1

    # DNS rebinding: public when checked, loopback right after. The connection goes to the checked address
    # (faked here: nothing leaves the machine), never to what a second lookup would say.
    dns = FakeDNS(monkeypatch, **{"rebind.example": [[PUBLIC], ["127.0.0.1"]]})
    connected: list[tuple[str, int]] = []

    def no_internet(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address)
        raise ConnectionRefusedError("no internet in tests")

    monkeypatch.setattr(socket, "create_connection", no_internet)
    with pytest.raises(ConnectionRefusedError):
        post_json(f"http://rebind.example:{listener.port}/hook", {"event": "x"}, 2.0)
    assert connected == [(PUBLIC, listener.port)] and dns.lookups == {"rebind.example": 1}
    assert len(listener.hits) == 1


def test_https_connects_to_the_checked_address_and_verifies_the_host_name(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS to the pinned address: SNI and the certificate check use the URL's host name, not the address."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks.lan")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.lan")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    tls.sni_callback = lambda _sock, server_name, _ctx: server_names.append(server_name)
    secure = Listener(204)
    secure.server.socket = tls.wrap_socket(secure.server.socket, server_side=True)
    trusting = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: trusting(cafile=str(cert_file)))
    FakeDNS(monkeypatch, **{"hooks.lan": [["127.0.0.1"]]})
    try:
        url = f"https://hooks.lan:{secure.port}/hook"
        assert post_json(url, {"event": "x"}, 2.0, allow=Allow.from_setting("hooks.lan")) == 204
        assert server_names == ["hooks.lan"] and [h["host"] for h in secure.hits] == [f"hooks.lan:{secure.port}"]
        with pytest.raises(ssl.SSLCertVerificationError, match="127.0.0.1"):  # the certificate is for hooks.lan
            post_json(f"https://127.0.0.1:{secure.port}/hook", {"event": "x"}, 2.0,
                      allow=Allow.from_setting("127.0.0.1"))
    finally:
        secure.close()
    assert len(secure.hits) == 1
