"""Which URLs and addresses a download may reach: only ``http``/``https``; never a link-local or
cloud-metadata address (``forbidden-address``); no other non-public address (private, loopback,
shared, reserved: ``private-address``) unless the URL's host is one the user allowed
(``allowed_hosts``, ``--allow-host HOST[:PORT]``, for a local mirror).

Addresses are checked as the host resolves, so every spelling of one (decimal, hex, IPv4-mapped
IPv6...) is the same address; an IPv6 address that carries an IPv4 one is checked as both. Apart
from the fetcher, so that robots.txt (``pipelines.optout``) checks URLs by the same rules.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from urllib.parse import urlsplit

from pipelines.fetch_errors import FetchError

# Cloud metadata services (AWS, GCP and Azure at 169.254.169.254, AWS over IPv6, Alibaba): never
# a download target, whatever the user allows; link-local addresses are refused as a whole.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)  # 168.63.129.16: Azure's WireServer, a public address that answers only inside Azure
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: reaches private networks
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_kind(text: str) -> str:
    """``forbidden`` (link-local, cloud metadata, unspecified), ``private`` (any other address
    that is not public: loopback, private, shared, reserved) or ``public``."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            candidates.append(embedded)
    kinds = set()
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES or candidate.is_link_local or candidate.is_unspecified:
            kinds.add("forbidden")
        elif not candidate.is_global or candidate in _LOCAL_NAT64:
            kinds.add("private")
    return "forbidden" if "forbidden" in kinds else "private" if kinds else "public"


DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=1024)
def url_origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``url``, lower case, the default port made explicit; ``None``
    for a URL without one, or one whose host the standard library and urllib3 (which
    ``requests`` connects with) read differently (``http://a\\@b/``: the checks would look at
    one host and the connection go to the other). Cached: each hop of a download asks three
    times (``check_url``, robots.txt's ``check_url``, the peer check's port)."""
    from urllib3.util import parse_url

    try:
        parts = urlsplit(url)
        port = parts.port
        connected = parse_url(url)
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not host:
        return None
    port = port if port is not None else DEFAULT_PORTS.get(scheme, 0)
    other_host = (connected.host or "").lower().removeprefix("[").removesuffix("]")
    other_port = connected.port if connected.port is not None else DEFAULT_PORTS.get(scheme, 0)
    if ((connected.scheme or "").lower(), other_host, other_port) != (scheme, host, port):
        return None
    return scheme, host, port


def parse_allowed_host(entry: str) -> tuple[str, int | None]:
    """``"host"`` or ``"host:port"`` (``"[::1]:8080"`` for IPv6) -> (host, port or None)."""
    text = entry.strip().lower()
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"{entry!r} is not HOST or HOST:PORT")
    return host, None if port is None else int(port)


@functools.lru_cache(maxsize=1024)  # asked twice per request to an allowed mirror
def is_allowed_host(host: str, port: int, allowed_hosts: tuple[str, ...]) -> bool:
    for entry in allowed_hosts:
        allowed, allowed_port = parse_allowed_host(entry)
        if allowed == host and allowed_port in (None, port):
            return True
    return False


def check_url(url: str, allowed_hosts: tuple[str, ...] = ()) -> str:
    """Return the host of ``url`` or raise: only http(s); never a forbidden address; no other
    non-public address unless the host is allowed."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise FetchError("bad-url", f"only http and https URLs are fetched, not {scheme or '?'}:")
    origin = url_origin(url)
    if origin is None:
        raise FetchError("bad-url", "no host, a bad port, or a host that reads two ways")
    _, hostname, port = origin
    kind, address = _address_kind(hostname)
    _apply_address_rule(kind, f"{hostname} resolves to {address}", hostname, port, allowed_hosts)
    return hostname


def check_peer(host: str, port: int, allowed_hosts: tuple[str, ...], address: str) -> None:
    """Raise unless a connection for ``host`` may have reached ``address``: the rule of
    :func:`check_url`, applied to the address the socket really connected to."""
    kind = address_kind(address)
    _apply_address_rule(kind, f"{host} connected to {address}", host, port, allowed_hosts)


def _apply_address_rule(
    kind: str, seen: str, host: str, port: int, allowed_hosts: tuple[str, ...]
) -> None:
    """The one rule for an address of ``kind``: forbidden never, private only for an allowed
    host; ``seen`` says how the address was met, for the failure detail."""
    if kind == "forbidden":
        raise FetchError(
            "forbidden-address", f"{seen} (link-local or cloud metadata: never fetched)"
        )
    if kind == "private" and not is_allowed_host(host, port, allowed_hosts):
        raise FetchError(
            "private-address", f"{seen}; for a local mirror allow it with --allow-host HOST[:PORT]"
        )


@functools.lru_cache(maxsize=4096)
def _address_kind(host: str) -> tuple[str, str | None]:
    """The most restricted kind among the addresses ``host`` resolves to, and that address
    (cached per process: a scrape asks about the same few hosts thousands of times)."""
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except UnicodeError:
        raise FetchError("bad-url", f"{host!r} is not a valid host name") from None
    except OSError as error:
        raise FetchError("dns-error", f"{host}: {error.strerror or error}") from None
    found: dict[str, str] = {}
    for address in addresses:
        found.setdefault(address_kind(address), address)
    for kind in ("forbidden", "private"):
        if kind in found:
            return kind, found[kind]
    return "public", None
