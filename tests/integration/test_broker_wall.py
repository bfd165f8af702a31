"""The simulated fleet's broker as a second wall: passwords, the fleet's ACL, TLS (the default)."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from harness import connect
from paho.mqtt.enums import CallbackAPIVersion

from edgekit_protocol import messages

pytestmark = pytest.mark.integration


def test_strangers_are_kept_out_and_each_device_is_confined_to_its_own_topics(sim):
    simfleet, fleet = sim(2)
    wall = simfleet.workdir / "broker-wall"
    password = {p.stem: p.read_text().strip() for p in (wall / "secrets").glob("*.pass")}
    ca = wall / "tls" / "ca.pem"
    broker = fleet.broker
    d1, d2 = (d.name for d in fleet.devices)

    anonymous, how = connect(broker, None, None, tls_ca=ca)
    assert how != "ok"
    wrong, how = connect(broker, d1, "guess", tls_ca=ca)
    assert how != "ok"
    plain, how = connect(broker, d1, password[d1])  # the TLS port, spoken to in plain text
    assert how != "ok"

    seen: list[str] = []
    operator, how = connect(broker, "operator", password["operator"], tls_ca=ca)
    assert how == "ok"
    operator.on_message = lambda _c, _u, m: seen.append(m.topic)
    operator.subscribe(f"{messages.ROOT}/{fleet.fleet}/#", qos=1)
    device, how = connect(broker, d1, password[d1], tls_ca=ca)
    assert how == "ok"
    got_cmd: list[str] = []
    device.on_message = lambda _c, _u, m: got_cmd.append(m.topic)
    device.subscribe(messages.topic(fleet.fleet, d2, "cmd"), qos=1)  # another device's commands
    time.sleep(0.5)
    for topic in (messages.topic(fleet.fleet, d1, "bench"),  # its own: allowed
                  messages.topic(fleet.fleet, d2, "bench"),  # in another's name: dropped
                  messages.topic(fleet.fleet, d2, "cmd"),  # a command: only the operator may
                  messages.topic(fleet.fleet, d1, "cmd")):  # not even to itself
        # Each from a fresh connection: the broker may drop a client that publishes where it may not.
        sender, how = connect(broker, d1, password[d1], tls_ca=ca)
        assert how == "ok"
        sender.publish(topic, b"{}", qos=1)
        time.sleep(0.3)
        sender.disconnect()
        sender.loop_stop()
    operator.publish(messages.topic(fleet.fleet, d2, "cmd"), b"{}", qos=1).wait_for_publish(5)
    time.sleep(1.0)
    for c in (anonymous, wrong, plain, operator, device):
        c.disconnect()
        c.loop_stop()
    assert messages.topic(fleet.fleet, d1, "bench") in seen
    assert messages.topic(fleet.fleet, d2, "bench") not in seen
    assert seen.count(messages.topic(fleet.fleet, d2, "cmd")) == 1  # the operator's, not the device's
    assert messages.topic(fleet.fleet, d1, "cmd") not in seen
    assert got_cmd == []  # d1 never reads d2's commands


def test_the_simulated_broker_never_puts_a_password_on_a_command_line(tmp_path, monkeypatch):
    """`sim up` used `mosquitto_passwd -b FILE USER PASSWORD`: every device's password in the process
    list of the machine for anyone to read; now the file is hashed in-process (mode 600 from the start)."""
    import subprocess

    from edge_kit.sim.broker import MosquittoBroker

    argvs: list[str] = []
    real_run, real_popen = subprocess.run, subprocess.Popen

    def run(argv, *a, **k):
        argvs.append(" ".join(map(str, argv)))
        return real_run(argv, *a, **k)

    class Popen(real_popen):
        def __init__(self, argv, *a, **k):
            argvs.append(" ".join(map(str, argv)))
            super().__init__(argv, *a, **k)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(subprocess, "Popen", Popen)
    password = "s3cret-for-cam-1-only"
    broker = MosquittoBroker(tmp_path / "broker", users={"cam-1": password}).start()
    try:
        assert argvs and not any(password in a for a in argvs), argvs
        assert (tmp_path / "broker" / "passwd").stat().st_mode & 0o777 == 0o600
        assert connect(broker, "cam-1", "guess")[1] != "ok"
        client, how = connect(broker, "cam-1", password)
        assert how == "ok"
        client.disconnect()
        client.loop_stop()
    finally:
        broker.stop()


def test_fleet_init_writes_a_wall_that_a_real_mosquitto_enforces(tmp_path, run_cli):
    """`edgekit fleet init` for a real fleet: the hashed passwd (written without mosquitto_passwd),
    the ACL, TLS and the hardened mosquitto.conf, run by a real Mosquitto as written."""
    import json
    import subprocess
    from types import SimpleNamespace

    import yaml

    from edge_kit.sim.broker import free_port, wait_port

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"fleet": "plant", "broker": {"host": "127.0.0.1", "port": 8883},
                                          "defaults": {"user": "pi", "key": "~/.ssh/id_ed25519"},
                                          "devices": [{"name": "cam-1", "host": "10.0.0.2", "profile": "rpi4"},
                                                      {"name": "cam-2", "host": "10.0.0.3", "profile": "jetson-orin-nano"}]}))
    port = free_port()
    code, out, err = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "127.0.0.1", "--port", port,
                             "--listen", "127.0.0.1", "--out", tmp_path / "wall", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["users"] == ["cam-1", "cam-2", "operator"] and made["agent_broker"]["cam-2"]["username"] == "cam-2"
    assert (tmp_path / "wall" / "secrets" / "cam-1.pass").stat().st_mode & 0o777 == 0o600
    secrets = [(tmp_path / "wall" / "secrets" / f"{u}.pass").read_text().strip() for u in made["users"]]
    hashed = (tmp_path / "wall" / "passwd").read_text()
    assert len(set(secrets)) == 3 and not any(s in hashed for s in secrets)  # hashed, never the plain text
    assert hashed.count("$7$101$") == 3
    again = run_cli("fleet", "init", "--fleet", fleet_file, "--broker-host", "x", "--out", tmp_path / "wall")
    assert again[0] == 2 and "never overwritten" in again[2]  # never overwrites a wall devices may use

    conf = tmp_path / "wall" / "mosquitto.conf"
    conf.write_text(conf.read_text() + "user root\n")  # the test owns the files (the conf says to chown them)
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port("127.0.0.1", port, 10), proc.stderr.read1().decode() if proc.poll() is not None else "no port"
        broker = SimpleNamespace(host="127.0.0.1", port=port)
        secret = {u: (tmp_path / "wall" / "secrets" / f"{u}.pass").read_text().strip() for u in made["users"]}
        ca = made["files"]["ca"]
        assert connect(broker, "cam-1", "guess", tls_ca=ca)[1] != "ok"
        assert connect(broker, None, None, tls_ca=ca)[1] != "ok"
        assert connect(broker, "cam-1", secret["cam-1"])[1] != "ok"  # the right password, but not over TLS
        seen: list[str] = []
        operator, how = connect(broker, "operator", secret["operator"], tls_ca=ca)
        assert how == "ok"
        operator.on_message = lambda _c, _u, m: seen.append(m.topic)
        operator.subscribe(f"{messages.ROOT}/plant/#", qos=1)
        time.sleep(0.3)
        cam1, how = connect(broker, "cam-1", secret["cam-1"], tls_ca=ca)
        assert how == "ok"
        for kind in ("bench", "live", "shadow"):
            cam1.publish(messages.topic("plant", "cam-1", kind), b"{}", qos=1).wait_for_publish(5)
            cam1.publish(messages.topic("plant", "cam-2", kind), b"{}", qos=1).wait_for_publish(5)  # not its own: dropped
        time.sleep(0.5)
        assert seen == [messages.topic("plant", "cam-1", kind) for kind in ("bench", "live", "shadow")]
        assert oversized_is_refused(cam1, messages.topic("plant", "cam-1", "bench"), seen)
        for c in (operator, cam1):
            c.disconnect()
            c.loop_stop()
    finally:
        proc.terminate()
        proc.wait(10)


def oversized_is_refused(client: mqtt.Client, topic: str, seen: list) -> bool:
    """Return True when a packet over the broker's max_packet_size from ``client`` on ``topic`` is refused: the broker
    drops the client and no subscriber (whose topics ``seen`` collects) gets it."""
    from edge_kit.fleet.broker_setup import MAX_PACKET

    before = len(seen)
    dropped = threading.Event()
    client.on_disconnect = lambda *_: dropped.set()
    client.publish(topic, b"x" * MAX_PACKET, qos=1)
    return dropped.wait(5) and (time.sleep(0.3) or len(seen) == before)


def test_the_simulated_broker_bounds_what_a_flooding_client_makes_it_hold(mosquitto):
    """The simulated broker (and so `edgekit sim`, the demo and the tests) ran with max_inflight_messages and
    max_queued_messages 0 (no bound) and Mosquitto's 256 MB packet limit: a device flooding the fleet made the broker
    push every message to the monitor unacknowledged, whose queue then grew without end, and one packet could be
    256 MB. Now a subscriber gets at most MAX_INFLIGHT messages it has not acknowledged, and a packet over the
    protocol's limit drops its sender."""
    from edge_kit.fleet.broker_setup import MAX_INFLIGHT

    received: list[str] = []
    slow = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="slow-monitor", manual_ack=True)  # never acknowledges
    slow.on_message = lambda _c, _u, m: received.append(m.topic)
    subscribed = threading.Event()
    slow.on_subscribe = lambda *_: subscribed.set()
    slow.connect(mosquitto.host, mosquitto.port)
    slow.loop_start()
    slow.subscribe(f"{messages.ROOT}/f/#", qos=1)
    flooder, how = connect(mosquitto, None, None)
    assert how == "ok" and subscribed.wait(10)
    topic = messages.topic("f", "d9", "telemetry")
    try:
        infos = [flooder.publish(topic, b"{}", qos=1) for _ in range(MAX_INFLIGHT + 500)]
        for info in infos:
            info.wait_for_publish(10)
        deadline = time.monotonic() + 20  # however busy the machine: until the broker stops sending
        while len(received) < MAX_INFLIGHT and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # room for any message past the bound to arrive
        assert len(received) == MAX_INFLIGHT
        assert oversized_is_refused(flooder, topic, received)
    finally:
        for c in (slow, flooder):
            c.disconnect()
            c.loop_stop()


def test_the_embedded_broker_refuses_a_packet_over_the_limit_mosquitto_sets_and_carries_the_rest():
    """The embedded amqtt broker (the demo's, where Mosquitto is missing) had none of broker_limits(): a client's
    packet of any size was read whole and passed on. amqtt's configuration takes no packet limit, so the broker reads
    each client's bytes through the MQTT framing and drops a client whose packet header says it is over MAX_PACKET,
    as Mosquitto's max_packet_size does; messages within it (the protocol's largest payload) still pass."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from edge_kit.sim.broker import free_port, wait_port
    from edge_kit.sim.process import terminate_pid

    broker = SimpleNamespace(host="127.0.0.1", port=free_port())
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "edge_kit.sim.embedded_broker",
                             "--host", broker.host, "--port", str(broker.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: list[mqtt.Client] = []
    try:
        assert wait_port(broker.host, broker.port, 30)
        seen: list[bytes] = []
        subscriber, how = connect(broker, None, None)
        clients.append(subscriber)
        subscribed = threading.Event()
        subscriber.on_subscribe = lambda *_: subscribed.set()
        subscriber.on_message = lambda _c, _u, m: seen.append(m.payload)
        subscriber.subscribe(f"{messages.ROOT}/f/#", qos=1)
        assert how == "ok" and subscribed.wait(10)
        device, how = connect(broker, None, None)
        clients.append(device)
        topic = messages.topic("f", "d1", "bench")
        device.publish(topic, b"y" * messages.MAX_PAYLOAD, qos=1).wait_for_publish(10)  # the largest a receiver takes
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [len(p) for p in seen] == [messages.MAX_PAYLOAD]
        assert oversized_is_refused(device, topic, seen)
        later, how = connect(broker, None, None)  # the broker itself carries on
        clients.append(later)
        later.publish(topic, b"z", qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert how == "ok" and seen[1:] == [b"z"]
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        terminate_pid(proc.pid)


def _walled_fleet(tmp_path):
    """Start Mosquitto with passwords (operator, d1, d2) and the fleet ACL, write fleet ``walled`` for the operator and
    register a key for d2; return ``(broker, users, fleet, d2's signer)``."""
    from device_agents.identity import Signer
    from edge_kit.fleet.broker_setup import fleet_acl
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.sim.broker import MosquittoBroker

    users = {"operator": "operator-secret", "d1": "d1-secret", "d2": "d2-secret"}
    broker = MosquittoBroker(tmp_path / "broker", users=users, acl=fleet_acl("walled")).start()
    (tmp_path / "operator.pass").write_text("operator-secret\n")
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: walled\nbroker: {{host: 127.0.0.1, port: {broker.port}, username: operator, "
                          f"password_file: {tmp_path / 'operator.pass'}}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n  - {name: d2, host: 127.0.0.1}\n")
    fleet = load_fleet(fleet_file)
    d2 = Signer.generate()
    fleet.key_store().register("d2", d2.public)
    return broker, users, fleet, d2


def _publish_telemetry_until_stored(publisher, d2, n: int, mon) -> None:
    """Publish ``n`` telemetry messages signed by d2 (seq 1..n), then wait up to 10 s for ``mon`` to store ``n``."""
    for seq in range(1, n + 1):
        msg = d2.sign(messages.envelope("telemetry", "walled", "d2", seq, {"conditions": {}, "spool": {}}))
        publisher.publish(messages.topic("walled", "d2", "telemetry"), messages.encode(msg), qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 10
    while mon.stats.stored < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_device_subscribing_to_the_monitors_shared_group_by_its_name_takes_no_record_from_it(tmp_path):
    """Mosquitto hands each message of a shared subscription to the group's members in turn and drops it when that
    member may not read it, and it lets any user subscribe: a device's broker user subscribed to
    `$share/<--share NAME>/...` took every other record of every device from `monitor --share NAME`, stored by no
    worker. The workers' group is named from NAME and the operator's broker password now, which no device holds."""
    from edge_kit.telemetry.monitor import Monitor
    from edge_kit.telemetry.store import Store

    broker, users, fleet, d2 = _walled_fleet(tmp_path)
    mon = Monitor(fleet, Store(tmp_path / "h.db"), share="monitors", workers=1, verify_in_child=False).start()
    intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
    intruder.username_pw_set("d1", users["d1"])
    subscribed = threading.Event()
    intruder.on_subscribe = lambda *_: subscribed.set()
    publisher, how = connect(broker, "d2", users["d2"])
    try:
        assert how == "ok"
        intruder.connect(broker.host, broker.port)
        intruder.loop_start()
        intruder.subscribe(f"$share/monitors/{messages.ROOT}/walled/+/telemetry", qos=1)
        assert subscribed.wait(10)
        n = 20
        _publish_telemetry_until_stored(publisher, d2, n, mon)
        assert mon.stats.stored == n, mon.stats
    finally:
        mon.stop()
        for c in (intruder, publisher):
            c.disconnect()
            c.loop_stop()
        broker.stop()


def test_another_device_connecting_with_the_client_id_an_agent_had_keeps_it_connected(tmp_path, digits_artifacts):
    """Mosquitto closes the connection of a client whose id another client connects with, whatever its user: an
    agent's id was `edgekit-agent-<fleet>-<device>`, which any device could name, so a compromised one could keep
    another off the broker, and with a clean session wipe the commands queued for it. The id now ends in a hash of the
    agent's broker password, which no other device holds."""
    from harness import FLEET, AgentProcess, wait_until

    from edge_kit.fleet.broker_setup import fleet_acl
    from edge_kit.sim.broker import MosquittoBroker

    users = {"operator": "operator-secret", "d1": "d1-secret", "d2": "d2-secret"}
    broker = MosquittoBroker(tmp_path / "broker", users=users, acl=fleet_acl(FLEET)).start()
    (tmp_path / "d2.pass").write_text("d2-secret\n")
    agent = AgentProcess(tmp_path, "d2", broker, digits_artifacts,
                         broker={"username": "d2", "password_file": str(tmp_path / "d2.pass")}).start()
    thief = None
    try:
        assert wait_until(lambda: agent.log.exists() and "connected to" in agent.log.read_text(), 60), \
            agent.log.read_text()[-2000:] if agent.log.exists() else "no log"
        thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgekit-agent-{FLEET}-d2", clean_session=True)
        thief.username_pw_set("d1", users["d1"])
        connected = threading.Event()
        thief.on_connect = lambda *_: connected.set()
        thief.connect(broker.host, broker.port)
        thief.loop_start()
        assert connected.wait(10)
        time.sleep(1.5)
        assert "disconnected from the broker" not in agent.log.read_text(), agent.log.read_text()[-2000:]
    finally:
        if thief is not None:
            thief.disconnect()
            thief.loop_stop()
        agent.stop()
        broker.stop()


def test_a_share_worker_upgraded_in_place_leaves_the_group_its_session_joined_under_the_bare_name(tmp_path):
    """A worker's persistent session (its default client id, kept an hour) holds its subscriptions: one started
    before the group was named from the operator's password had joined `$share/NAME/...`, and an upgraded one added
    `$share/NAME.<hash>/...` to it. The broker then handed each record to the worker once for each group: every record
    came twice, spent its device's ingest budget twice, and the bare group stayed open to any device. The worker now
    leaves the bare group at its connect."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_kit.telemetry.monitor import STORED_KINDS, Monitor
    from edge_kit.telemetry.store import Store

    broker, users, fleet, d2 = _walled_fleet(tmp_path)
    old = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="worker-1", protocol=mqtt.MQTTv5)
    old.username_pw_set("operator", users["operator"])
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    subscribed = threading.Event()
    old.on_subscribe = lambda *_: subscribed.set()
    old.connect(broker.host, broker.port, clean_start=False, properties=props)
    old.loop_start()
    old.subscribe([(messages.subscription("walled", k, share="monitors"), 1) for k in STORED_KINDS])
    assert subscribed.wait(10)
    old.disconnect()
    old.loop_stop()
    mon = Monitor(fleet, Store(tmp_path / "h.db"), share="monitors", workers=1, client_id="worker-1", persistent=True,
                  verify_in_child=False).start()
    publisher, how = connect(broker, "d2", users["d2"])
    try:
        assert how == "ok"
        n = 10
        _publish_telemetry_until_stored(publisher, d2, n, mon)
        time.sleep(1.0)  # a second copy of each would have come by now
        assert (mon.stats.stored, mon.stats.duplicates) == (n, 0), mon.stats
    finally:
        mon.stop()
        publisher.disconnect()
        publisher.loop_stop()
        broker.stop()


def test_an_agent_upgraded_to_its_hashed_client_id_drops_the_session_its_plain_one_kept(tmp_path, digits_artifacts):
    """An agent before its client id ended in a hash of its password connected as `edgekit-agent-<fleet>-<device>`
    with a persistent session; upgraded, it connects under the new id and nothing read the old session again, which
    Mosquitto kept for ever, queuing in it every command and desired state sent to the device since (up to 100,000
    messages, with no byte limit). The agent now drops it once connected."""
    from harness import FLEET, AgentProcess, wait_until

    from edge_kit.fleet.broker_setup import fleet_acl
    from edge_kit.sim.broker import MosquittoBroker

    users = {"operator": "operator-secret", "d2": "d2-secret"}
    broker = MosquittoBroker(tmp_path / "broker", users=users, acl=fleet_acl(FLEET)).start()
    former = f"edgekit-agent-{FLEET}-d2"

    def session_kept() -> bool:
        """Connect as the former id, keeping its session (subscribed to d2's commands); return whether the broker
        held one already."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=former, clean_session=False)
        client.username_pw_set("d2", users["d2"])
        flags: list[bool] = []
        subscribed = threading.Event()
        client.on_connect = lambda _c, _u, f, *_: flags.append(f.session_present)
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            assert wait_until(lambda: bool(flags), 10)
            client.subscribe(messages.topic(FLEET, "d2", "cmd"), qos=1)
            assert subscribed.wait(10)
        finally:
            client.disconnect()
            client.loop_stop()
        return flags[0]

    assert not session_kept()  # the older agent's session, left on the broker
    (tmp_path / "d2.pass").write_text("d2-secret\n")
    agent = AgentProcess(tmp_path, "d2", broker, digits_artifacts,
                         broker={"username": "d2", "password_file": str(tmp_path / "d2.pass")}).start()
    try:
        assert wait_until(lambda: agent.log.exists() and "connected to" in agent.log.read_text(), 60), \
            agent.log.read_text()[-2000:] if agent.log.exists() else "no log"
        assert wait_until(lambda: "dropped the broker session" in agent.log.read_text(), 20), agent.log.read_text()[-2000:]
        assert not session_kept()
    finally:
        agent.stop()
        broker.stop()
