"""Emulated device links for a simulated fleet: a network namespace per device behind a shaped veth.

A real fleet's deploy is bound by each device's link (Wi-Fi, 100 Mbit Ethernet), not by the host's
CPU; on loopback, simulated devices are bound by the cores they share with the host. With
``edgekit sim up --link-rate 50mbit`` every device's sshd and agent run in a network namespace of
their own, joined to the host by a veth pair on one bridge, and a token-bucket filter (``tc tbf``)
limits both directions of every device's link to that rate. The host end of the bridge is the
broker's address. Addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for network
benchmarks, one /24 per simulated fleet. Needs root (CAP_NET_ADMIN) and iproute2. Rate only: no
delay or loss (``netem`` is not in every kernel; the one edge-kit's CI runs on lacks it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

from edge_kit.errors import EdgeKitError, InputError

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_UNIT = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
MAX_DEVICES = 253  # 198.18.k.2 .. 198.18.k.254
_QUEUE_MS = 100  # a Wi-Fi-like buffer: the most a packet waits in the shaper before it is dropped


def parse_rate(text: str) -> int:
    """Return the rate ``text`` (``50mbit``, ``800kbit``, ``1gbit``; decimal units as in tc) in bit/s.

    Raises:
        InputError: not a rate, or zero.
    """
    m = _RATE.match(text.strip().lower())
    bits = int(float(m.group(1)) * _UNIT[m.group(2)]) if m else 0
    if bits < 8_000:
        raise InputError(f"--link-rate {text}: give a rate of at least 8kbit, such as 50mbit or 1gbit")
    return bits


@dataclass(frozen=True)
class Links:
    """The links of one simulated fleet: subnet 198.18.``net``.0/24, ``count`` devices at ``rate`` bit/s."""

    net: int
    count: int
    rate: int

    @property
    def bridge(self) -> str:
        return f"ekbr{self.net}"

    @property
    def host_address(self) -> str:
        """The host's address on the bridge: where the devices reach the broker."""
        return f"198.18.{self.net}.1"

    def address(self, i: int) -> str:
        return f"198.18.{self.net}.{i + 2}"

    def namespace(self, i: int) -> str:
        return f"edgekit-{self.net}-{i}"

    def host_veth(self, i: int) -> str:
        """The host end of device ``i``'s link; its egress is the device's download."""
        return f"ek{self.net}h{i}"

    def wrap(self, i: int) -> tuple[str, ...]:
        """The command prefix that runs a program inside device ``i``'s namespace."""
        return ("ip", "netns", "exec", self.namespace(i))

    def describe(self) -> str:
        return f"{self.rate / 1e6:g} Mbit/s each way per device (tc tbf, emulated)"

    def to_state(self) -> dict:
        return asdict(self)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise EdgeKitError(f"emulated links: `{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}; "
                           "run without --link-rate")


def _subnets_in_use() -> str:
    return subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=30).stdout


def create_links(count: int, rate: int) -> Links:
    """Create a bridge and ``count`` shaped links, one network namespace per device.

    Returns:
        The links; remove them with :func:`remove_links`.

    Raises:
        EdgeKitError: not root, iproute2 missing, too many devices, no free subnet, or a command
            failed (what was created is removed again).
    """
    if os.geteuid() != 0:
        raise EdgeKitError("--link-rate needs root (CAP_NET_ADMIN) to create network namespaces; run as root or drop --link-rate")
    if not (shutil.which("ip") and shutil.which("tc")):
        raise EdgeKitError("--link-rate needs iproute2 (ip and tc): apt install iproute2")
    if count > MAX_DEVICES:
        raise EdgeKitError(f"--link-rate supports at most {MAX_DEVICES} devices per simulated fleet, not {count}")
    routes = _subnets_in_use()
    for net in range(256):
        if f"198.18.{net}.0/24" in routes:
            continue
        # Creating the bridge claims the subnet: a second `sim up` racing for it gets "File exists".
        if subprocess.run(["ip", "link", "add", f"ekbr{net}", "type", "bridge"], capture_output=True, timeout=30).returncode == 0:
            break
    else:
        raise EdgeKitError("--link-rate: every 198.18.x.0/24 subnet is taken; stop other simulated fleets first")
    links = Links(net, count, rate)
    try:
        _build(links)
    except BaseException:
        remove_links(links)
        raise
    return links


def _build(links: Links) -> None:
    _run("ip", "addr", "add", f"{links.host_address}/24", "dev", links.bridge)
    _run("ip", "link", "set", links.bridge, "up")
    # A tbf bucket must hold at least one full GSO packet and one timer tick of traffic.
    burst = max(64 * 1024, links.rate // 8 // 100)
    shaper = ["root", "tbf", "rate", f"{links.rate}bit", "burst", str(burst), "latency", f"{_QUEUE_MS}ms"]
    for i in range(links.count):
        ns, host_end, device_end = links.namespace(i), links.host_veth(i), f"ek{links.net}d{i}"
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", device_end, "netns", ns)
        _run("ip", "link", "set", host_end, "master", links.bridge, "up")
        _run("ip", "-n", ns, "link", "set", device_end, "name", "eth0")
        _run("ip", "-n", ns, "addr", "add", f"{links.address(i)}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("tc", "qdisc", "add", "dev", host_end, *shaper)
        _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", *shaper)


def remove_links(links: Links) -> None:
    """Delete the veth pairs, the namespaces and the bridge; what is gone already is skipped."""
    for i in range(links.count):
        # Deleting the host end takes its peer along even while a leftover process keeps the namespace.
        subprocess.run(["ip", "link", "delete", links.host_veth(i)], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "delete", links.namespace(i)], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "delete", links.bridge], capture_output=True, timeout=30)
