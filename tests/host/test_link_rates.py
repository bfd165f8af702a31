"""Link rates for `edgekit sim up --link-rate`, read like tc reads them (decimal units)."""

import pytest

from edge_kit.errors import EdgeKitError, InputError
from edge_kit.sim import links
from edge_kit.sim.links import Links, parse_rate


@pytest.mark.parametrize("text, bits", [("50mbit", 50_000_000), ("800kbit", 800_000), ("1gbit", 1_000_000_000),
                                        ("2.5Mbit", 2_500_000), (" 8kbit ", 8_000)])
def test_rates(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "50", "50mb", "0mbit", "1kbit", "-5mbit"])
def test_bad_rates_say_what_to_give(text):
    with pytest.raises(InputError, match=rf"--link-rate {text.strip()}: give a rate of at least 8kbit"):
        parse_rate(text)


def test_one_fleet_one_subnet_and_names_within_linux_limits():
    big = Links(net=255, count=253, rate=50_000_000)
    assert (big.host_address, big.address(0), big.address(252)) == ("198.18.255.1", "198.18.255.2", "198.18.255.254")
    assert max(len(big.bridge), len(big.host_veth(252))) <= 15  # IFNAMSIZ - 1


def test_links_without_root_or_iproute2_are_refused_before_anything_is_created(monkeypatch):
    ran = []
    monkeypatch.setattr(links.subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(links.os, "geteuid", lambda: 1000)
    with pytest.raises(EdgeKitError, match=r"--link-rate needs root \(CAP_NET_ADMIN\).*run as root or drop --link-rate"):
        links.create_links(2, 50_000_000)
    monkeypatch.setattr(links.os, "geteuid", lambda: 0)
    monkeypatch.setattr(links.shutil, "which", lambda name: None if name == "tc" else f"/usr/sbin/{name}")
    with pytest.raises(EdgeKitError, match=r"--link-rate needs iproute2 \(ip and tc\): apt install iproute2"):
        links.create_links(2, 50_000_000)
    assert ran == []
