"""Where a schedule's webhook may post: public addresses only, unless `CONVERGE_WEBHOOK_ALLOW` lists the target.

Why: a webhook URL is chosen by whoever holds an `admin` token, but the server posts to it from inside its own
network. Without a rule, `http://127.0.0.1:5432/`, `http://169.254.169.254/` (a cloud's metadata service) or
`http://[::1]/` would make the server probe addresses only it can reach, and the attempts it records (status,
error, seconds) would tell the caller which of them answer: server-side request forgery (SSRF).

The rule: http and https only, to addresses that are globally reachable unicast, i.e. not loopback, link-local,
private, shared (100.64.0.0/10), multicast, unspecified or reserved, nor such an IPv4 address in an IPv6 form
(IPv4-mapped `::ffff:127.0.0.1`, NAT64 `64:ff9b::/96`, 6to4, Teredo). `CONVERGE_WEBHOOK_ALLOW`
(`Settings.webhook_allow`: hosts and networks, e.g. `127.0.0.1,10.0.0.0/8,hooks.lan`) lets through a URL whose
host name is listed or whose address lies in a listed network. An entry that is neither an address nor a
network is taken as a host name (so a mistyped network allows nothing).

It is checked twice. When a schedule is created or changed (`url_problem`: a 422, or exit status 2), so a
mistake shows at once; a host name that does not resolve there is let through to the second check. And at
each delivery (`resolve`), on the addresses the host name resolves to then: every one must be allowed, and
the connection goes to one of those very addresses (`open_connection`; TLS still verified against the host
name), never resolving the name again, so a DNS answer that changes between the check and the connection
(DNS rebinding) cannot slip through. Redirects are never followed (`service.webhooks`).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from converge.core.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HINT = ("webhooks go to public addresses only, unless CONVERGE_WEBHOOK_ALLOW lists the host or a network "
        "containing the address")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# (what an address is, ipaddress's test for it), most telling first: 169.254.169.254 is link-local before private
KINDS = (("an unspecified", "is_unspecified"), ("a loopback", "is_loopback"), ("a link-local", "is_link_local"),
         ("a multicast", "is_multicast"), ("a reserved", "is_reserved"), ("a private", "is_private"))


class Refused(ValueError):
    """A URL the rule does not allow; the message says why and names CONVERGE_WEBHOOK_ALLOW where it helps."""


def embedded_ipv4(address: Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address stands for, with the name of the form: (`IPv4-mapped`, 127.0.0.1)..."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if address.ipv4_mapped is not None:
        found.append(("IPv4-mapped", address.ipv4_mapped))
    if address in NAT64:
        found.append(("NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)))
    if address.sixtofour is not None:
        found.append(("6to4", address.sixtofour))
    if address.teredo is not None:
        found += [("Teredo", v4) for v4 in address.teredo]
    return found


def not_public(address: Address) -> str | None:
    """Why `address` is no public unicast address (`a loopback address`...); None when it is one."""
    embedded = embedded_ipv4(address)
    for form, v4 in embedded:
        why = not_public(v4)
        if why:
            return f"the {form} form of {v4}, {why}"
    if any(form in ("IPv4-mapped", "NAT64") for form, _ in embedded):
        return None  # these reach a.b.c.d itself, public as checked (DNS64 answers NAT64 ones for public hosts)
    for kind, test in KINDS:
        if getattr(address, test):
            return f"{kind} address"
    return None if address.is_global else "not a globally reachable address"


@dataclass(frozen=True)
class Allow:
    """The exceptions to the rule: host names (lower case) and networks, from `CONVERGE_WEBHOOK_ALLOW`."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allow:
        hosts: set[str] = set()
        networks: list[Network] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    @classmethod
    def from_setting(cls, value: str) -> Allow:
        """From the setting's text, e.g. `127.0.0.1,10.0.0.0/8,hooks.lan`."""
        return cls.parse(Settings.split(value))

    def permits(self, host: str, address: Address) -> bool:
        """The host name is listed, or a listed network holds the address (or the IPv4 address it stands for)."""
        if host.lower().rstrip(".") in self.hosts:
            return True
        candidates = [address, *(v4 for _, v4 in embedded_ipv4(address))]
        return any(a in network for a in candidates for network in self.networks)


PUBLIC_ONLY = Allow()


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (its host's allowed addresses, resolved once) and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[Address, ...]


def resolve(url: str, allow: Allow) -> Target:
    """The URL's host resolved once, every address checked: Refused naming the first one not allowed.
    A name that does not resolve raises socket.gaierror (an OSError)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(f"scheme {scheme or '(none)'!r} is not allowed: webhooks are http:// or https:// URLs")
    host = parts.hostname
    if not host:
        raise Refused(f"{url!r} has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise Refused(f"{url!r} has a bad port") from None
    try:
        addresses: tuple[Address, ...] = (ipaddress.ip_address(host),)
        literal = True
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses = tuple(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        literal = False
    for address in addresses:
        why = None if allow.permits(host, address) else not_public(address)
        if why:
            where = f"{host} is" if literal else f"{host} resolves to {address},"
            raise Refused(f"{where} {why}: {HINT}")
    path = parts.path or "/"
    return Target(scheme, host, port, f"{path}?{parts.query}" if parts.query else path, addresses)


def url_problem(url: str, allow: Allow) -> str | None:
    """Why a schedule may not have this webhook URL; None when it may. A host name that does not resolve here
    (yet) is let through: each delivery checks it again."""
    try:
        resolve(url, allow)
    except Refused as exc:
        return str(exc)
    except (OSError, UnicodeError):
        return None
    return None


def _connect(addresses: tuple[Address, ...], port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers (literal addresses: no lookup)."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((str(address), port), timeout)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout_s: float):
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.addresses = target.addresses

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout_s: float):
        self.tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout_s, context=self.tls)
        self.addresses = target.addresses

    def connect(self) -> None:
        self.sock = self.tls.wrap_socket(_connect(self.addresses, self.port, self.timeout),
                                         server_hostname=self.host)


def open_connection(target: Target, timeout_s: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the target's checked addresses only, its host name in `Host` (and, for https,
    in SNI and the certificate check). No proxy, no redirect: the caller reads the one answer."""
    return (_PinnedHTTPS if target.scheme == "https" else _PinnedHTTP)(target, timeout_s)
