"""Link rates for `edgekit sim up --link-rate`, read like tc reads them (decimal units)."""

import pytest

from edge_kit.errors import InputError
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
    links = Links(net=255, count=253, rate=50_000_000)
    assert (links.host_address, links.address(0), links.address(252)) == ("198.18.255.1", "198.18.255.2", "198.18.255.254")
    assert max(len(links.bridge), len(links.host_veth(252))) <= 15  # IFNAMSIZ - 1
