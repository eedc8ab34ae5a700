"""Which IP addresses DeployHub connects to on a user's behalf: the public internet, never this
machine, its networks or a cloud's metadata services.

The one check for both places that do: the repository URL (deployhub/validation.py, before
the clone) and the build's egress proxy (worker/egress.py, every connection a build makes).
`refusal(address, local=...)` names why an address is refused, or returns None for a public
one. It is the explicit list below (RFC 6890's special-purpose blocks that lead inside a
network, and the IPv6 forms that carry an IPv4 address), not `ipaddress.is_global`, which
disagrees both ways: it lets through 6to4 and NAT64 forms of private addresses
(2002:c0a8:101::1, 64:ff9b::a00:1), IPv4-compatible ones (::10.0.0.1), local-use NAT64
(64:ff9b:1::/48), Azure's metadata address 168.63.129.16 and non-unicast IPv6 (5f00::/8);
and it refuses the documentation and benchmarking blocks (192.0.2/24, 198.51.100/24,
203.0.113/24, 198.18/15, 2001:db8::/32, 2001:2::/48), which lead nowhere private and which
test networks (and some registry mirrors) use, so they are allowed here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = [(ipaddress.IPv4Network(net), why) for net, why in (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared CGNAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    # Public addresses that answer only from inside a cloud: Azure's host agent (WireServer).
    ("168.63.129.16/32", "cloud metadata"),
)]
_V6 = [(ipaddress.IPv6Network(net), why) for net, why in (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("fc00::/7", "unique local (RFC 4193)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)]
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refusal(address: str | IPAddress, *, local: Collection[str] = ()) -> str | None:
    """Why DeployHub may not connect to `address` ("loopback", "private (RFC 1918)", ...,
    "this machine's own" when it is one of `local`, see local_addresses()), or None when it
    is a public address. Anything that is not an IP address is refused."""
    try:
        ip = address if not isinstance(address, str) else ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if why := _special(ip):
        return why
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return "this machine's own" if str(mapped or ip) in local else None


def _special(ip: IPAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return next((why for net, why in _V4 if ip in net), None)
    # An IPv6 address that carries an IPv4 one leads wherever that one leads.
    embedded = ip.ipv4_mapped or ip.sixtofour
    if embedded is None and ip in _NAT64:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if embedded is not None:
        inner = _special(embedded)
        return f"{inner}, in IPv6" if inner else None
    if why := next((why for net, why in _V6 if ip in net), None):
        return why
    if ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def local_addresses() -> frozenset[str]:
    """The addresses of this machine's own interfaces (in the caller's network namespace):
    a build must not reach the host through its public address either."""
    found: set[str] = set()
    lines = _lines("/proc/net/fib_trie")
    for previous, line in zip(lines, lines[1:]):
        if line.strip().startswith("/32 host LOCAL") and "|--" in previous:
            found.add(previous.split("|--", 1)[1].strip())
    for row in _lines("/proc/net/if_inet6"):
        hexed = row.split()[0] if row.split() else ""
        if len(hexed) == 32:
            found.add(str(ipaddress.IPv6Address(int(hexed, 16))))
    return frozenset(found)


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []
