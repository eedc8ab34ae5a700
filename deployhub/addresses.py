"""Which IP addresses build code may connect to: the public internet, never this machine, its
networks or a cloud's metadata services.

`refusal(address)` names why an address is refused, or returns None for a public one. It is
an explicit list (RFC 6890's special-purpose blocks that lead inside a network), not
`ipaddress.is_global`: that also refuses the documentation and benchmarking blocks
(192.0.2/24, 198.51.100/24, 203.0.113/24, 198.18/15), which lead nowhere private and which
test networks (and some registry mirrors) use.
"""

from __future__ import annotations

import ipaddress

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


def refusal(address: str | IPAddress) -> str | None:
    """Why build code may not connect to `address` ("loopback", "private (RFC 1918)", ...),
    or None when it is a public address. Anything that is not an IP address is refused."""
    try:
        ip = address if not isinstance(address, str) else ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv4Address):
        return next((why for net, why in _V4 if ip in net), None)
    # An IPv6 address that carries an IPv4 one leads wherever that one leads.
    embedded = ip.ipv4_mapped or ip.sixtofour
    if embedded is None and ip in _NAT64:
        embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if embedded is not None:
        inner = refusal(embedded)
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
