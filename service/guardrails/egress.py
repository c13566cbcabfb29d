"""Outbound connections to user-supplied addresses go to public IP addresses only (SSRF).

Integrations call URLs their users typed. Checking the URL's text is not enough: its host can
be a name that resolves to a private address, or one of the spellings of an IP address that the
system resolver accepts and ``ipaddress`` does not (``127.1``, ``2130706433``, ``0x7f000001``).
So the check is made where the connection is opened, on every address the host resolves to:
if any of them is not public, nothing is connected. The connection then goes to the address
that was checked (each in turn, as the system's connect does), so a second resolution (DNS
rebinding) cannot swap it; TLS still verifies the certificate against the URL's host name.

Public means :attr:`ipaddress.IPv4Address.is_global` and not multicast: loopback, private,
link-local (cloud metadata at 169.254.169.254), shared (100.64/10), reserved and unspecified
ranges are refused; IPv6 addresses that carry an IPv4 one (mapped, NAT64, 6to4, ...) are
judged by it.

Setting: ``VIGIL_INTEGRATIONS_ALLOW_PRIVATE_NETWORKS`` (tests, local development) turns the
check off. A refusal raises :class:`EgressRefused` (an ``httpcore.ConnectError``, so httpx
reports ``httpx.ConnectError``); the integration caller counts it as a ``transport_error``,
records it in the integration's ``last_error`` and logs ``integration_egress_refused``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import Callable

import httpcore
import httpx

__all__ = ["EgressRefused", "PublicOnlyBackend", "is_public_address", "public_addresses", "public_only_transport"]


class EgressRefused(httpcore.ConnectError):
    """``host`` resolved to ``address``, which is not a public address. The message names
    neither: it reaches users (an integration's ``last_error``), and telling them which private
    address an internal name has would map the internal network for them. Log ``address``."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__("the host does not resolve to a public address")
        self.host, self.address = host, address


_EMBEDDING_IPV4 = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64, well-known prefix
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # NAT64, local use
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated)
)


def is_public_address(text: str) -> bool:
    """True for a globally routable unicast IP address (``text`` as ``getaddrinfo`` gives it).
    An IPv6 address carrying an IPv4 one (mapped, translated, NAT64, 6to4, IPv4-compatible)
    is judged by that IPv4 address: DNS64 and NAT64 networks reach it that way."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            return is_public_address(str(ip.sixtofour))
        if any(ip in net for net in _EMBEDDING_IPV4):
            return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    return ip.is_global and not ip.is_multicast


async def public_addresses(host: str, port: int, allowed: Callable[[str], bool] = is_public_address) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order, once every one of them is
    ``allowed`` (public)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not allowed(address):
            raise EgressRefused(host, address)
    if not addresses:  # pragma: no cover - getaddrinfo raises rather than answer nothing
        raise httpcore.ConnectError(f"cannot resolve {host}")
    return addresses


class PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to public addresses (see the module).
    ``allowed`` decides which resolved address is acceptable (tests widen it to loopback)."""

    def __init__(
        self, inner: httpcore.AsyncNetworkBackend | None = None, allowed: Callable[[str], bool] = is_public_address
    ) -> None:
        self._inner = inner or httpcore.AnyIOBackend()
        self._allowed = allowed

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        async with asyncio.timeout(timeout):
            addresses = await public_addresses(host, port, self._allowed)
        failure: Exception | None = None
        for address in addresses:  # as the system's connect would: the next one when one fails
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # addresses is never empty
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressRefused(path, "a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def public_only_transport(allowed: Callable[[str], bool] = is_public_address) -> httpx.AsyncHTTPTransport:
    """An httpx transport (httpx's default limits, no proxy from the environment) whose
    connections go through :class:`PublicOnlyBackend`.

    httpx has no public parameter for httpcore's network backend, so the transport's connection
    pool is replaced by one built with it (``_pool`` is what ``AsyncHTTPTransport`` sends
    through; ``test_public_only_transport_connects_to_the_address_it_checked`` would fail if
    that changed)."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100,  # httpx's default limits
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=PublicOnlyBackend(allowed=allowed),
    )
    return transport
