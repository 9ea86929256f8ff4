"""Keys bound to networks: a key with `allowed_networks` works only from those addresses.

A key leaks with the app that holds it (a config file in a repository, a laptop); bound to the CRM servers' subnet,
the copy is useless anywhere else. The address is the TCP peer's, unless that peer is one of the gateway's
`trusted_proxies` (an ingress controller, a load balancer): then it is the right-most address of `X-Forwarded-For`
that is not a trusted proxy itself, since each proxy appends the address it saw and only the right end can be
trusted. A header from anyone else is ignored: a client could write anything there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from gateway import errors as E

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str], field: str) -> tuple[Network, ...]:
    """CIDRs (or single addresses) as networks; a ValueError naming the bad one and `field`."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{field}: {v!r} is not an IP address or network (10.1.0.0/16, 192.0.2.7, "
                             f"2001:db8::/32)") from None
    return tuple(out)


class Origins:
    """Where a request comes from, given the proxies this gateway trusts to say so."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted = parse_networks(trusted_proxies, "trusted_proxies")

    def _is_trusted(self, ip: Any) -> bool:
        return any(ip in net for net in self.trusted)

    def client(self, scope: dict) -> Any:
        """The caller's address (an ipaddress object), or None when the server did not say."""
        peer = scope.get("client")
        try:
            ip = _address(peer[0]) if peer else None
        except ValueError:
            return None
        if ip is None or not self.trusted or not self._is_trusted(ip):
            return ip
        forwarded = b",".join(v for k, v in scope.get("headers") or () if k == b"x-forwarded-for")
        if not forwarded.strip():
            return ip  # the proxy itself called, or forwarded no address
        for hop in reversed(forwarded.decode("latin-1").split(",")):
            try:
                ip = _address(hop.strip())
            except ValueError:
                return None  # a hop no proxy of ours wrote: nothing further left can be trusted
            if not self._is_trusted(ip):
                return ip
        return ip

    def check(self, entry: Any, scope: dict) -> None:
        """Raise the 403 when `entry` is bound to networks and this request comes from none of them; the error
        carries the key (`refused_key`) so that the attempt is audited under it."""
        ip = self.client(scope)
        if ip is not None and any(ip in net for net in entry.networks):
            return
        refused = E.GatewayError(403, f"This API key ({entry.id}) may not be used from {ip or 'an unknown address'}; "
                                      f"ask its administrator.", type="permission_error", code="network_not_allowed")
        refused.refused_key = entry
        refused.decisions = {"network": {"action": "refused", "client": str(ip) if ip else None}}
        raise refused


def _address(text: str) -> Any:
    """An address; an IPv4 one that a dual-stack socket reports as ::ffff:a.b.c.d is its IPv4 self, as networks
    name it."""
    ip = ipaddress.ip_address(text)
    return ip.ipv4_mapped or ip if ip.version == 6 else ip
