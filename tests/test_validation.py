"""Repo URL checks run before any connection: the resolver is the only thing they touch."""

from __future__ import annotations

import re

import pytest

from deployhub.validation import InvalidInput, check_repo_url, project_from_url, slugify


def resolver_for(addresses: list[str]):  # type: ignore[no-untyped-def]
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return addresses

    return resolve, calls


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "::1",
     "fd00::1", "fe80::1", "0.0.0.0", "100.64.0.1", "::ffff:127.0.0.1", "224.0.0.1"],
)
async def test_non_public_addresses_are_refused(address: str) -> None:
    resolve, calls = resolver_for([address])
    with pytest.raises(InvalidInput, match="non-public address"):
        await check_repo_url("https://git.example.com/a/b.git", resolver=resolve)
    assert calls == [("git.example.com", 443)]


# Where the repo URL check (ipaddress.is_global) and the egress proxy's list used to disagree;
# both now use deployhub/addresses.py.
@pytest.mark.parametrize(("address", "why"), [
    ("2002:c0a8:101::1", "private (RFC 1918), in IPv6"),  # 6to4 of 192.168.1.1
    ("64:ff9b::a00:1", "private (RFC 1918), in IPv6"),  # NAT64 of 10.0.0.1
    ("64:ff9b:1::1", "local-use NAT64"),
    ("::10.0.0.1", "IPv4-compatible"),
    ("168.63.129.16", "cloud metadata"),  # Azure's WireServer: "global" to ipaddress
    ("5f00::1", "reserved"),
    ("192.0.0.9", "IETF protocol assignments"),
])
async def test_addresses_the_egress_list_refuses_are_refused_for_clones_too(address: str, why: str) -> None:
    resolve, _ = resolver_for([address])
    with pytest.raises(InvalidInput, match=f"non-public address \\({address}\\), a {re.escape(why)}"):
        await check_repo_url("https://git.example.com/a/b.git", resolver=resolve, local=())


@pytest.mark.parametrize("address", ["192.0.2.10", "198.51.100.7", "203.0.113.80", "198.18.0.1",
                                     "2001:db8::1", "2001:2::1"])
async def test_documentation_and_benchmark_ranges_are_allowed_as_for_builds(address: str) -> None:
    resolve, _ = resolver_for([address])
    repo = await check_repo_url("https://git.example.com/a/b.git", resolver=resolve, local=())
    assert repo.addresses == (address,)


async def test_this_machines_own_public_address_is_refused() -> None:
    resolve, _ = resolver_for(["93.184.216.34"])
    with pytest.raises(InvalidInput, match="this machine's own"):
        await check_repo_url("https://git.example.com/a/b.git", resolver=resolve,
                             local={"93.184.216.34"})


async def test_one_private_address_among_public_ones_is_refused() -> None:
    resolve, _ = resolver_for(["93.184.216.34", "10.0.0.5"])
    with pytest.raises(InvalidInput, match="10.0.0.5"):
        await check_repo_url("http://git.example.com:8080/a.git", resolver=resolve)


async def test_public_address_passes_and_is_kept_for_pinning() -> None:
    resolve, calls = resolver_for(["93.184.216.34"])
    repo = await check_repo_url("https://git.example.com/a/b.git", resolver=resolve)
    assert repo.addresses == ("93.184.216.34",) and repo.port == 443
    assert calls == [("git.example.com", 443)]


async def test_allowlisted_host_may_be_private() -> None:
    resolve, _ = resolver_for(["127.0.0.1"])
    repo = await check_repo_url("http://127.0.0.1:9/a.git", resolver=resolve, allow_hosts=["127.0.0.1"])
    assert repo.host == "127.0.0.1"


async def test_unresolvable_host_is_a_clear_error() -> None:
    async def fail(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(InvalidInput, match="could not be resolved"):
        await check_repo_url("https://nowhere.invalid/a.git", resolver=fail)


def test_project_names_are_dns_label_slugs() -> None:
    assert project_from_url("https://h/acme/My_Cool.App.git") == "my-cool-app"
    assert slugify("--Ünïcode  name--") == "unicode-name"
    assert len(slugify("x" * 100)) == 40
    with pytest.raises(InvalidInput):
        project_from_url("https://h/acme/___.git")
