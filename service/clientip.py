"""The client's IP address: ``X-Forwarded-For`` is believed only through trusted proxies.

The header is walked right to left starting from the socket peer: while the hop we are looking
at is a trusted proxy, the address it forwarded for is the next candidate. The first untrusted
address is the client. A client cannot forge its way in: whatever it prepends sits to the left
of the first address a trusted proxy appended, and is never reached.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["TrustedProxies", "client_ip", "request_ip", "trusted_proxies"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A parsed ``VIGIL_TRUSTED_PROXIES`` list (CIDRs or single addresses)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)

    def __contains__(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def _forwarded_for(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    hops: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            hops.extend(part.strip() for part in value.decode("latin-1").split(",") if part.strip())
    return hops


def client_ip(scope: Mapping[str, Any], trusted: TrustedProxies) -> str:
    """The client address for ``scope`` (an ASGI HTTP or WebSocket scope)."""
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    if not trusted.networks or peer not in trusted:
        return peer
    hops = _forwarded_for(scope.get("headers", ()))
    candidate = peer
    while hops and candidate in trusted:
        candidate = hops.pop()
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:  # garbage in the header: the last trustworthy hop answers for it
        return peer


@lru_cache(maxsize=8)
def trusted_proxies(networks: tuple[str, ...]) -> TrustedProxies:
    """The parsed list for a ``trusted_proxies`` setting, parsed once per process."""
    return TrustedProxies(networks)


def request_ip(scope: Mapping[str, Any], networks: tuple[str, ...]) -> str:
    """:func:`client_ip` with the ``trusted_proxies`` setting as it is (what audit records use)."""
    return client_ip(scope, trusted_proxies(networks))
