"""Webhook signatures and the SSRF guard, shared by the API (refuse a bad ``callback_url`` at
submission) and the worker's sender (check again at every delivery: DNS answers change).

Signature (Stripe's scheme): ``X-Heatmap-Signature: t=<unix seconds>,v1=<hex>`` where
``hex = HMAC-SHA256(WEBHOOK_SECRET, "<t>." + body)``. Signing the timestamp with the body lets
a receiver refuse replays older than a tolerance; `verify_signature` is what a receiver runs.

Destinations: a callback must match ``WEBHOOK_ALLOWED_HOSTS`` (a host name, ``*.suffix``, an
IP address, or a URL prefix) and every address its host resolves to must be public, unless
it lies in ``WEBHOOK_ALLOWED_NETWORKS``. Private, loopback, link-local (cloud metadata lives at
169.254.169.254 and fd00:ec2::254), multicast, reserved and unspecified addresses are refused
otherwise. The sender connects to the address it checked, so a second DNS answer cannot
redirect the request, and it never follows redirects.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.exceptions import InputError
from shared.jobspec import CALLBACK_URL_MAX_LENGTH
from shared.settings import Settings

SIGNATURE_HEADER = "X-Heatmap-Signature"
EVENT_HEADER = "X-Heatmap-Event"
DELIVERY_HEADER = "X-Heatmap-Delivery"
MAX_URL_LENGTH = CALLBACK_URL_MAX_LENGTH
#: Metadata endpoints outside the link-local ranges (Alibaba Cloud, Oracle Cloud's IPv4 is link-local).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")})


class DestinationRefused(InputError):
    """A callback URL the settings do not allow, or whose host resolves to a refused address."""

    def __init__(self, message: str):
        super().__init__("invalid_callback_url", message)


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for `body` sent at `timestamp` (now by default)."""
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300.0, now: float | None = None
) -> bool:
    """True when `header` signs `body` with `secret` and is at most `tolerance_s` old (receivers' side)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass(frozen=True)
class Destination:
    """A checked callback: where to connect (an address that passed the guard) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


def _host_allowed(url: str, host: str, allowed: list[str]) -> bool:
    for entry in allowed:
        entry = entry.strip()
        if entry.lower().startswith(("http://", "https://")):
            if url.startswith(entry) and (entry.endswith("/") or url[len(entry) :][:1] in ("", "/", "?")):
                return True
        elif entry.startswith("*."):
            if host.endswith(entry[1:].lower()):
                return True
        elif host == entry.lower().strip("[]"):
            return True
    return False


def _address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: list[str]) -> bool:
    if any(address in ipaddress.ip_network(net, strict=False) for net in networks):
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    special = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address in METADATA_ADDRESSES
    )
    return not special


def parse_callback_url(url: str, settings: Settings) -> tuple[str, str, int, str]:
    """Shape and allow-list checks without DNS: (scheme, host, port, path with query)."""
    if not settings.webhook_secret or not settings.webhook_allowed_hosts:
        raise DestinationRefused("webhooks are not enabled on this service (WEBHOOK_SECRET, WEBHOOK_ALLOWED_HOSTS)")
    if len(url) > MAX_URL_LENGTH or any(ord(c) < 33 for c in url):
        raise DestinationRefused(f"callback_url must be a URL of at most {MAX_URL_LENGTH} characters, no spaces")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise DestinationRefused("callback_url is not a valid URL") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise DestinationRefused("callback_url must be http(s)://host[:port]/path without credentials")
    if not _host_allowed(url, host, settings.webhook_allowed_hosts):
        raise DestinationRefused("callback_url's host is not in WEBHOOK_ALLOWED_HOSTS")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, path


def check_destination(url: str, settings: Settings) -> Destination:
    """Resolve the callback's host and check every address; the first one is used to connect.
    Raises `DestinationRefused` when any address is refused (a mixed answer is a rebinding trick)."""
    scheme, host, port, path = parse_callback_url(url, settings)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DestinationRefused("callback_url's host does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        if not _address_allowed(ipaddress.ip_address(address.split("%", 1)[0]), settings.webhook_allowed_networks):
            raise DestinationRefused("callback_url resolves to a private, loopback, link-local or metadata address")
    return Destination(scheme, host, port, addresses[0], path)
