"""`edgekit sim up --link-rate`: each device in its own network namespace behind a shaped link."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from edge_kit.sim.links import Links

pytestmark = pytest.mark.integration


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def tx_bytes(interface: str) -> int:
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


@pytest.mark.parametrize("servers", [(), ("--embedded-ssh", "--embedded-broker", "--insecure")], ids=["sshd+mosquitto", "embedded"])
def test_devices_behind_emulated_links_take_deploys_through_them_and_down_removes_them(
        tmp_path, digits_artifacts, run_cli, servers):
    simdir = tmp_path / "sim"
    code, out, err = run_cli("sim", "up", "--devices", "2", "--profiles", "rpi4", "--dir", simdir, "--link-rate", "20mbit",
                             *servers, "--json")
    try:
        assert code == 0, err
        info = json.loads(out)
        assert info["links"] == "20 Mbit/s each way per device (tc tbf, emulated)"
        state = json.loads((simdir / "sim.json").read_text())
        links = Links(**state["links"])
        assert info["broker"]["host"] == links.host_address
        assert [d["ssh"] for d in info["devices"]] == [f"{links.address(0)}:22", f"{links.address(1)}:22"]
        # Each device's sshd and agent share a network namespace of their own.
        for i, dev in enumerate(state["devices"]):
            agent_pid = int((Path(dev["root"]) / "agent.pid").read_text())
            assert netns_of(dev["sshd_pid"]) == netns_of(agent_pid) != netns_of(os.getpid())
            shaper = subprocess.run(["tc", "qdisc", "show", "dev", links.host_veth(i)], capture_output=True, text=True).stdout
            assert "tbf" in shaper and "rate 20Mbit" in shaper
        assert netns_of(state["devices"][0]["sshd_pid"]) != netns_of(state["devices"][1]["sshd_pid"])

        before = tx_bytes(links.host_veth(0)), tx_bytes(links.host_veth(1))
        code, out, err = run_cli("deploy", "--fleet", simdir / "fleet.yaml", "--artifacts", digits_artifacts,
                                 "--variant", "int8", "--devices", info["devices"][0]["name"], "--json")
        assert code == 0, out + err
        assert json.loads(out)["counts"]["succeeded"] == 1
        uploaded = sum(a["bytes"] for a in json.loads((digits_artifacts / "manifest.json").read_text())["artifacts"])
        assert tx_bytes(links.host_veth(0)) - before[0] >= uploaded  # the upload crossed device 0's link
        assert tx_bytes(links.host_veth(1)) - before[1] < uploaded
    finally:
        code, out, err = run_cli("sim", "down", "--dir", simdir, "--json")
    assert code == 0 and "emulated links" in json.loads(out)["stopped"]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert links.namespace(0) not in namespaces and links.namespace(1) not in namespaces
    assert not Path(f"/sys/class/net/{links.bridge}").exists() and not Path(f"/sys/class/net/{links.host_veth(0)}").exists()


def test_a_bad_link_rate_is_refused_before_anything_starts(tmp_path, run_cli):
    code, out, err = run_cli("sim", "up", "--devices", "1", "--dir", tmp_path / "sim", "--link-rate", "fast")
    assert code != 0 and "--link-rate fast: give a rate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sim" / "sim.json").exists()
