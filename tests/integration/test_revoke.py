"""`edgekit fleet revoke` on a simulated fleet (real sshd, agent and Mosquitto with its wall), and the way back
(`edgekit deploy --new-key`)."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from harness import connect, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from device_agents.identity import Signer, key_id
from edge_kit.fleet.commands import FleetClient
from edge_kit.telemetry.monitor import Monitor
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages

pytestmark = pytest.mark.integration


def connects(broker, user: str, password: str, ca: Path) -> str:
    """Return how a fresh connection as ``user`` goes: "ok" or the broker's reason (the client is let go)."""
    client, how = connect(broker, user, password, tls_ca=ca)
    client.disconnect()
    client.loop_stop()
    return how


def retained(fleet, device: str, ca: Path, quiet_s: float = 2.0) -> dict[str, bytes]:
    """Return what the broker holds retained under ``device``'s topics ({kind: payload}), as a fresh subscriber with
    the operator's credentials is sent it (waiting ``quiet_s`` after the last one)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"retained-{time.monotonic_ns()}")
    client.username_pw_set(fleet.broker.username, fleet.broker_password())
    client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    got: dict[str, bytes] = {}
    last = [time.monotonic()]

    def on_message(_c, _u, m):
        if m.retain:
            got[m.topic.rsplit(f"/{device}/", 1)[1]] = m.payload
            last[0] = time.monotonic()

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(f"{messages.ROOT}/{fleet.fleet}/{device}/#", 1)
    try:
        client.connect(fleet.broker.host, fleet.broker.port)
        client.loop_start()
        time.sleep(0.2)
        wait_until(lambda: time.monotonic() - last[0] > quiet_s, 15)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_a_revoked_device_is_refused_everywhere_until_deploy_new_key_gives_it_a_fresh_key(sim, digits_artifacts,
                                                                                         run_cli, tmp_path):
    """The only way to stop a stolen device was to edit keys/devices.json by hand, and the next deploy to it
    registered the key it holds again (read over SSH). Now `fleet revoke` moves the key to the revoked list and
    removes the device's broker user; its records are refused as revoked, a deploy refuses it in one line, and
    `deploy --new-key` brings it back with a fresh key pair and broker password."""
    simfleet, fleet = sim(1)
    dev = fleet.devices[0]
    wall = simfleet.workdir / "broker-wall"
    ca = wall / "tls" / "ca.pem"
    old_password = (wall / "secrets" / f"{dev.name}.pass").read_text().strip()
    stolen = Signer.load(Path(dev.root) / "identity" / "device.key")  # what a thief holding the device has
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store).start()
    try:
        assert wait_until(lambda: dev.name in store.latest_status(), 30)  # its retained status, stored
        with FleetClient.of(fleet) as client:  # what a rollout leaves retained for it, and a reported state
            for kind in ("desired", "reported"):
                client.client.publish(messages.topic(fleet.fleet, dev.name, kind), b'{"left": "retained"}', qos=1,
                                      retain=True).wait_for_publish(10)
        assert set(retained(fleet, dev.name, ca)) == {"status", "desired", "reported"}
        code, out, err = run_cli("fleet", "revoke", dev.name, "--fleet", simfleet.fleet_file, "--reason", "stolen")
        assert code == 0, err
        assert f"key {stolen.key_id} revoked" in out and "the simulated broker read it again (SIGHUP)" in out, out
        assert "its retained status, reported and desired messages cleared on the broker" in " ".join(out.split()), out
        # nothing left for a receiver that subscribes now to be sent and refuse: a monitor started afresh stores none
        assert retained(fleet, dev.name, ca) == {}
        fresh = Store(tmp_path / "fresh.db")
        other = Monitor(fleet, fresh, client_id="revoke-fresh-monitor").start()
        try:
            time.sleep(2)
        finally:
            other.stop()
        assert other.stats.invalid == 0 and fresh.refused_messages(limit=10) == [], fresh.refused_messages(limit=10)
        # the clears reached the running monitor too: taken as no message, not stored as refused
        assert not [r for r in store.refused_messages(dev.name, limit=100) if not r["payload"]]
        assert connects(fleet.broker, dev.name, old_password, ca) != "ok"  # its broker user is gone
        # and the connection its agent had open was closed at the reload (Mosquitto checks connected clients
        # against the password file it read again): the agent is turned away when it connects again
        agent_log = Path(dev.root) / "agent.log"
        assert wait_until(lambda: "refused the connection: Not authorized" in agent_log.read_text(), 20), \
            agent_log.read_text()[-2000:]
        code, out, err = run_cli("fleet", "revoke", dev.name, "--fleet", simfleet.fleet_file)
        assert code == 0 and "already revoked on" in out, out
        code, out, err = run_cli("fleet", "revoke", "rpi4-9", "--fleet", simfleet.fleet_file)
        assert code == 2 and "rpi4-9: no key is registered for it" in err and len(err.strip().splitlines()) == 1, err

        # the thief publishes a record signed with the stolen key (through any way onto the broker)
        record = stolen.sign(messages.envelope("status", fleet.fleet, dev.name, 10**6, {"state": "online"}))
        with FleetClient.of(fleet) as client:
            client.client.publish(messages.topic(fleet.fleet, dev.name, "status"), messages.encode(record),
                                  qos=1).wait_for_publish(10)
        assert wait_until(lambda: any(r["payload"] and record["msg_id"] in r["payload"]
                                      for r in store.refused_messages(dev.name, limit=100)), 20)
        refused = next(r for r in store.refused_messages(dev.name, limit=100) if record["msg_id"] in r["payload"])
        assert f"{dev.name}'s key {stolen.key_id} was revoked on" in refused["reason"] and "stolen" in refused["reason"]
        assert record["msg_id"] not in json.dumps(store.latest_status())

        code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
        assert code == 0, err
        assert json.loads(out)["state"][dev.name]["state"] == "revoked"

        # a deploy reads the stolen key over SSH: refused in one line, nothing registered, nothing written
        code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts, "--json")
        assert code == 4, err
        result = json.loads(out)["devices"][0]
        assert result["status"] == "failed" and result["actions"] == []
        assert result["reason"].startswith(f"{dev.name}: its key {stolen.key_id} was revoked on ") and result["reason"].endswith(
            ": re-image it or run deploy with --new-key to give it a fresh key pair"), result["reason"]
        assert fleet.key_store().devices() == {}

        # --new-key to every device does not readmit it: --devices must name it
        code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts, "--new-key",
                                 "--json")
        result = json.loads(out)["devices"][0]
        assert code == 0 and result["status"] == "skipped" and "--devices does not name it" in result["reason"], out
        assert fleet.key_store().devices() == {} and connects(fleet.broker, dev.name, old_password, ca) != "ok"

        # the way back: a fresh key pair and a fresh broker password
        code, out, err = run_cli("deploy", "--fleet", simfleet.fleet_file, "--artifacts", digits_artifacts, "--new-key",
                                 "--devices", dev.name)
        assert code == 0, out + err
        assert "added back" in out and "fresh key pair" in out, out
        new = fleet.key_store().devices()[dev.name]
        assert key_id(new) != stolen.key_id
        assert (Path(dev.root) / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
        assert len(fleet.key_store().revoked()) == 1  # the stolen key stays revoked
        assert connects(fleet.broker, dev.name, old_password, ca) != "ok"  # the old password stays out
        assert wait_until(lambda: (store.latest_status().get(dev.name) or {}).get("key_id") == key_id(new), 30)
        code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
        assert json.loads(out)["state"][dev.name]["state"] == "online", out
    finally:
        mon.stop()


def restart_sim_broker(simfleet) -> None:
    """Stop the simulated fleet's Mosquitto (SIGTERM: it sends the wills of the clients connected and saves its
    persistence file) and start it again with the same configuration, as `systemctl restart mosquitto` does; its new
    pid goes to sim.json, so `sim down` stops it."""
    import subprocess

    from edge_kit.sim.broker import find_mosquitto, wait_port
    from edge_kit.sim.process import started_at, terminate_pid

    state = simfleet.state()
    broker = state["broker"]
    assert terminate_pid(broker["pid"], started=broker["started"])
    folder = simfleet.workdir / "broker"
    with open(folder / "mosquitto.out", "ab") as out:
        proc = subprocess.Popen([find_mosquitto(), "-c", str(folder / "mosquitto.conf")], stdout=out, stderr=out,
                                start_new_session=True)
    state["broker"] = {**broker, "pid": proc.pid, "started": started_at(proc.pid)}
    simfleet._save(state)
    assert wait_port(broker["host"], broker["port"], 10)


def test_the_last_will_a_broker_restart_publishes_for_a_revoked_device_is_dropped_by_every_receiver(sim, run_cli,
                                                                                                    tmp_path):
    """A real broker learns of a revocation when its operator reloads or restarts it, after `fleet revoke` cleared the
    device's retained status. A restart (Mosquitto 2.0 sends every connected client's will as it goes down) published
    the device's last will, `offline` and retained, signed with the revoked key when it connected: the monitor then
    refused it at every start (a `refused` alert) and `fleet status` counted it as refused, until `fleet revoke` was
    run a second time. Now every receiver drops what a revoked device left at the broker: not stored, not refused, not
    shown."""
    simfleet, fleet = sim(2)
    dev, other_dev = fleet.devices
    ca = simfleet.workdir / "broker-wall" / "tls" / "ca.pem"
    revoked_key = Signer.load(Path(dev.root) / "identity" / "device.key").key_id
    store = Store(tmp_path / "h.db")
    mon = Monitor(fleet, store, client_id="revoke-will-monitor", persistent=True).start()
    try:
        assert wait_until(lambda: {dev.name, other_dev.name} <= set(store.latest_status()), 30)
        # the wall of a real broker: the command rewrites its passwd, and the broker is restarted afterwards
        code, out, err = run_cli("fleet", "revoke", dev.name, "--fleet", simfleet.fleet_file, "--broker-dir",
                                 simfleet.workdir / "broker")
        assert code == 0 and "systemctl reload mosquitto" in out, out + err
        assert retained(fleet, dev.name, ca) == {}
        restart_sim_broker(simfleet)
        will = retained(fleet, dev.name, ca).get("status")  # what the broker published as it went down
        assert will is not None and json.loads(will)["state"] == "offline" and json.loads(will)["key_id"] == revoked_key
        # the running monitor reconnects: the will, queued for its session, and the retained copy are dropped
        assert wait_until(lambda: mon.stats.left_by_revoked >= 1, 30), mon.stats
        time.sleep(1)
        assert mon.stats.invalid == 0 and store.refused_messages(limit=10) == [], store.refused_messages(limit=10)
        assert not [a for a in mon.alerts if a.kind == "refused"], [a.text for a in mon.alerts]
    finally:
        mon.stop()
    fresh = Store(tmp_path / "fresh.db")
    other = Monitor(fleet, fresh, client_id="revoke-will-fresh").start()
    try:
        assert wait_until(lambda: other.stats.left_by_revoked == 1, 15), other.stats
    finally:
        other.stop()
    assert other.stats.invalid == 0 and fresh.refused_messages(limit=10) == []
    assert list(fresh.latest_status()) == [other_dev.name]  # the other device's retained status; nothing of the revoked
    code, out, err = run_cli("fleet", "status", "--fleet", simfleet.fleet_file, "--json")
    assert code == 0, err
    said = json.loads(out)
    assert said["state"][dev.name]["state"] == "revoked" and list(said["retained"]) == [other_dev.name], said["retained"]
    assert "refused" not in said["state_source"] and "1 left by revoked devices, ignored" in said["state_source"], \
        said["state_source"]
    # the will stays retained until it is cleared: the monitor names the command, and one more run of it clears it for
    # good (the device cannot connect again, so no broker restart sends its will again)
    assert other.retained_leftovers == {dev.name}
    code, out, err = run_cli("fleet", "revoke", dev.name, "--fleet", simfleet.fleet_file, "--broker-dir",
                             simfleet.workdir / "broker")
    assert code == 0 and "already revoked on" in out, out + err
    assert retained(fleet, dev.name, ca) == {}
    restart_sim_broker(simfleet)
    assert retained(fleet, dev.name, ca) == {}
