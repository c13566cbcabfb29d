"""Client IP resolution: X-Forwarded-For only through trusted proxies, right to left."""

from __future__ import annotations

from typing import Any

from service.clientip import TrustedProxies, client_ip

TRUSTED = TrustedProxies(["10.0.0.0/8", "192.168.1.1"])


def scope(peer: str, *xff: str) -> dict[str, Any]:
    return {"client": (peer, 1234), "headers": [(b"x-forwarded-for", v.encode()) for v in xff]}


def test_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    """A spoofed X-Forwarded-For from an untrusted peer cannot change the client address."""
    assert client_ip(scope("203.0.113.9", "1.2.3.4"), TRUSTED) == "203.0.113.9"


def test_no_trusted_proxies_means_the_socket_peer() -> None:
    """With no trusted networks configured, the header is ignored entirely."""
    assert client_ip(scope("10.1.1.1", "1.2.3.4"), TrustedProxies([])) == "10.1.1.1"


def test_trusted_chain_is_walked_right_to_left() -> None:
    """Through two trusted proxies, the first untrusted hop from the right is the client, and
    whatever the client prepended is never reached."""
    s = scope("10.0.0.5", "6.6.6.6, 198.51.100.7, 10.0.0.9")
    assert client_ip(s, TRUSTED) == "198.51.100.7"


def test_several_headers_are_one_list() -> None:
    """Repeated X-Forwarded-For headers are read as one comma-separated list, in order."""
    assert client_ip(scope("192.168.1.1", "198.51.100.1", "10.0.0.2"), TRUSTED) == "198.51.100.1"


def test_garbage_hop_falls_back_to_the_last_trusted_hop() -> None:
    """An unparsable address in the header never becomes the client key."""
    assert client_ip(scope("10.0.0.5", "not-an-ip"), TRUSTED) == "10.0.0.5"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    """When every hop is a trusted proxy, the leftmost address is the best answer."""
    assert client_ip(scope("10.0.0.5", "10.0.0.7, 10.0.0.6"), TRUSTED) == "10.0.0.7"
