"""Which http(s) inputs a worker may fetch: addresses, host names, the allowlist setting. Pure, table-driven."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from zimage_worker.settings import WorkerSettings
from zimage_worker.storage import allowed_hosts_list, host_allowed, public_address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1",
        "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of 127.0.0.1 and of the metadata address
        "2002:7f00:1::1", "2002:a00:1::1",  # 6to4 of 127.0.0.1 and 10.0.0.1
        "2001:db8::1",  # documentation
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("images.example", [], False),
        ("images.example", ["images.example"], True),
        ("Images.Example.", ["images.example"], True),  # case and the root dot do not matter
        ("evil-images.example", ["images.example"], False),
        ("images.example.evil", ["images.example"], False),
        ("a.cdn.example", ["*.cdn.example"], True),
        ("a.b.cdn.example", ["*.cdn.example"], True),
        ("cdn.example", ["*.cdn.example"], False),  # the wildcard is for names under it
        ("xcdn.example", ["*.cdn.example"], False),
        ("8.8.8.8", ["8.8.8.8"], True),
        ("8.8.4.4", ["8.8.8.8"], False),
    ],
)
def test_host_allowed(host: str, allowed: list[str], ok: bool) -> None:
    assert host_allowed(host, allowed) is ok


@pytest.mark.parametrize(
    ("value", "hosts"),
    [
        ("", []),
        ("images.example", ["images.example"]),
        (" Images.Example. , *.CDN.example ,", ["images.example", "*.cdn.example"]),
        ('["a.example", "b.example"]', ["a.example", "b.example"]),
        (["a.example"], ["a.example"]),
        ("8.8.8.8,2606:4700:4700::1111", ["8.8.8.8", "2606:4700:4700::1111"]),
    ],
)
def test_allowlist_setting_parses(value: object, hosts: list[str]) -> None:
    assert allowed_hosts_list(value) == hosts


@pytest.mark.parametrize("entry", ["http://a.example", "a.example/path", "a.example:8080", "user@a.example", "*", "*."])
def test_allowlist_entries_that_are_not_hosts_are_errors(entry: str) -> None:
    with pytest.raises(ValueError, match="fetch allowlist entry"):
        allowed_hosts_list(entry)


def test_worker_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZIMAGE_FETCH_ALLOWED_HOSTS", raising=False)
    assert WorkerSettings().fetch_allowed_hosts == []  # default: no http(s) inputs at all
    monkeypatch.setenv("ZIMAGE_FETCH_ALLOWED_HOSTS", "images.example,*.cdn.example")
    assert WorkerSettings().fetch_allowed_hosts == ["images.example", "*.cdn.example"]
    monkeypatch.setenv("ZIMAGE_FETCH_ALLOWED_HOSTS", '["images.example"]')
    assert WorkerSettings().fetch_allowed_hosts == ["images.example"]
    monkeypatch.setenv("ZIMAGE_FETCH_ALLOWED_HOSTS", "http://images.example/")
    with pytest.raises(ValidationError, match="fetch allowlist entry"):
        WorkerSettings()
