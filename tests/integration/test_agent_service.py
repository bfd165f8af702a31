"""`edgekit-agent run` against a real Mosquitto: commands, acks, records, outages, bad input."""

from __future__ import annotations

import json
import random
import socket
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from harness import (
    FLEET,
    KEYRING,
    OPERATOR,
    AgentProcess,
    make_tls,
    online,
    share_keys,
    spool_count,
    spool_inbox,
    spool_taken,
    wait_until,
)
from paho.mqtt.enums import CallbackAPIVersion

from edge_kit.errors import AgentError
from edge_kit.fleet.commands import FleetClient
from edge_kit.sim.broker import MosquittoBroker
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages
from edgekit_protocol.config import BrokerConfig as Broker
from edgekit_protocol.config import TlsConfig

pytestmark = pytest.mark.integration


def client_for(broker, **kw) -> FleetClient:
    return FleetClient(Broker(host=broker.host, port=broker.port, **kw), FLEET, signer=OPERATOR, keyring=KEYRING)


def test_bench_round_trip_host_to_agent_and_back(agents, mosquitto, monitor):
    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30), agent.log.read_text() if agent.log.exists() else "no log"
    birth = [m for m in monitor.messages["status"] if m["device"] == "dev1"][-1]
    assert birth["current"]["variant"] == "int8" and birth["simulated"] is True
    with client_for(mosquitto) as client:
        ack = client.request("dev1", "bench", {"variant": "dynamic-int8", "min_runs": 20}, timeout=60)
        assert client.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # no 40 ms Nagle waits
    rec = ack["record"]
    assert rec["schema"] == "edgekit.bench/1" and rec["device"] == "dev1" and rec["fleet"] == FLEET
    assert rec["variant"] == "dynamic-int8" and rec["sha256"] == agent.sha["dynamic-int8"]
    assert rec["cmd_id"] == ack["cmd_id"] and rec["runs"] >= 20 and rec["simulated"] is True
    assert rec["accuracy"]["samples"] == 360 and rec["accuracy"]["value"] > 0.85
    assert rec["fidelity"]["top1_agreement"] > 0.9
    assert rec["power"]["estimated"] or rec["power"]["measured"]
    assert rec["power"]["method"].startswith(("estimated:", "rapl", "hwmon"))
    assert ack["result"]["latency_p90_ms"] == rec["latency_ms"]["p90"]


def test_unknown_variant_is_an_error_ack_naming_what_is_installed(agents, mosquitto, monitor):
    agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    with client_for(mosquitto) as client, pytest.raises(AgentError, match="variant 'fp16' is not installed.*int8"):
        client.request("dev1", "bench", {"variant": "fp16"}, timeout=30)


def test_records_survive_a_broker_outage_and_an_agent_restart_exactly_once(agents, mosquitto, monitor):
    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    with client_for(mosquitto) as client:
        sent = [client.send("dev1", "bench", {"min_runs": 10, "min_seconds": 1.0}) for _ in range(3)]
        # the agent has the commands (on disk) before the broker goes; their benchmarks take a second each
        assert wait_until(lambda: spool_taken(agent.root) == 3, 30), "the agent did not take the commands"
    mosquitto.stop()
    assert wait_until(lambda: spool_count(agent.root, "bench") == 3, 30), "benchmarks did not complete offline"
    assert agent.stop() == 0  # graceful stop with records still spooled
    unreachable = agent.log.read_text().count("cannot reach the broker")
    agent.start()  # restarts offline: replays the spool once the broker is back
    # the broker comes back once the agent has found it down (a fixed 1 s sleep let a loaded machine's agent start late,
    # with the broker already back: the offline restart went untested)
    assert wait_until(lambda: agent.log.read_text().count("cannot reach the broker") > unreachable, 60), \
        agent.log.read_text()[-2000:]
    mosquitto.start()
    assert monitor.wait_for(lambda m: len([r for r in m["bench"] if r["device"] == "dev1"]) >= 3, 60)
    time.sleep(0.5)  # room for any duplicate to arrive
    records = [r for r in monitor.messages["bench"] if r["device"] == "dev1"]
    assert sorted(r["cmd_id"] for r in records) == sorted(sent)  # each exactly once after dedup by msg_id
    assert [r["seq"] for r in sorted(records, key=lambda r: r["seq"])] == [1, 2, 3]  # no gap
    assert monitor.wait_for(lambda m: {a["cmd_id"] for a in m["cmd/ack"]} >= set(sent), 30)
    assert wait_until(lambda: spool_count(agent.root, "bench") == 0, 10)  # released on PUBACK


def test_a_corrupt_or_broken_model_is_refused_and_the_old_one_keeps_serving(agents, mosquitto, monitor, tmp_path):
    agent = agents("dev1")
    store = agent.store
    # a truncated copy under the sha256 of the real file: the sha check catches it
    good = agent.sha["fp32"]
    truncated = store.models / ("f" * 64)
    truncated.mkdir()
    (truncated / "model.tflite").write_bytes(store.model_path(good).read_bytes()[:1000])
    (truncated / "meta.json").write_text(json.dumps({"sha256": "f" * 64, "variant": "fp32", "model": "digits"}))
    # a file that hashes right but is not a model: the smoke inference in the child catches it
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"TFL3" + bytes(5000))
    broken = store.install(junk, variant="broken", model="digits").sha256
    assert monitor.wait_for(online("dev1"), 30)
    with client_for(mosquitto) as client:
        with pytest.raises(AgentError, match="corrupt or truncated"):
            client.request("dev1", "activate", {"sha256": "f" * 64}, timeout=30)
        with pytest.raises(AgentError, match="smoke inference"):
            client.request("dev1", "activate", {"variant": "broken"}, timeout=60)
        assert store.current() == agent.sha["int8"] and store.previous() is None
        rec = client.request("dev1", "bench", {}, timeout=60)["record"]
        assert rec["variant"] == "int8" and rec["sha256"] == agent.sha["int8"]
        done = client.request("dev1", "activate", {"variant": "fp32"}, timeout=60)["result"]
        assert done["changed"] and store.current() == good and store.previous() == agent.sha["int8"]
        client.request("dev1", "rollback", timeout=30)
        assert store.current() == agent.sha["int8"]
        state = client.request("dev1", "state", timeout=30)["result"]
    assert state["current"]["variant"] == "int8" and state["previous"]["variant"] == "fp32"
    assert {m["sha256"] for m in state["installed"]} >= {broken, *agent.sha.values()}
    assert monitor.wait_for(lambda m: m["status"][-1]["current"]["variant"] == "int8", 10)


def test_an_upload_is_installed_by_the_running_agent_from_incoming_only_and_only_when_its_sha256_matches(
        agents, mosquitto, monitor, digits_artifacts):
    agent = agents("dev1")
    store, sha = agent.store, agent.sha["dynamic-int8"]
    model_bytes = store.model_path(sha).read_bytes()
    store.remove(sha)  # as if it had never been deployed here
    incoming = agent.root / "incoming"
    incoming.mkdir(exist_ok=True)
    upload, eval_upload = incoming / f"{sha}.tflite.part", incoming / "eval.npz"
    upload.write_bytes(model_bytes)
    eval_upload.write_bytes((digits_artifacts / "eval.npz").read_bytes())
    args = {"path": str(upload), "sha256": sha, "variant": "dynamic-int8", "model": "digits", "eval": str(eval_upload)}
    assert monitor.wait_for(online("dev1"), 30)
    with client_for(mosquitto) as client:
        with pytest.raises(AgentError, match="corrupt or truncated"):
            client.request("dev1", "install", {**args, "sha256": "0" * 64}, timeout=30)
        with pytest.raises(AgentError, match="not an upload under"):
            client.request("dev1", "install", {**args, "path": str(agent.config)}, timeout=30)
        with pytest.raises(AgentError, match="not an upload under"):
            client.request("dev1", "install", {**args, "path": str(incoming / ".." / "agent.yaml")}, timeout=30)
        with pytest.raises(AgentError, match="missing argument"):
            client.request("dev1", "install", {"path": str(upload)}, timeout=30)
        assert agent.config.is_file() and store.describe(sha) is None  # nothing moved, nothing installed
        done = client.request("dev1", "install", args, timeout=30)["result"]
        assert done == {"sha256": sha, "variant": "dynamic-int8", "model": "digits", "fresh": True}
        assert not upload.exists() and eval_upload.exists()  # the model was moved, the shared eval set copied
        assert store.model_path(sha).read_bytes() == model_bytes and store.eval_path(sha) is not None
        rec = client.request("dev1", "bench", {"variant": "dynamic-int8", "min_runs": 5}, timeout=60)["record"]
        state = client.request("dev1", "state", timeout=30)["result"]
    assert rec["sha256"] == sha and rec["accuracy"]["value"] is not None
    assert 0 < state["disk"]["free_bytes"] and store.current() == agent.sha["int8"]  # installing never activates


def _fuzz_payloads(n: int, rng: random.Random) -> list[bytes]:
    def envelope(**over):
        msg = {"schema": "edgekit.cmd/1", "device": "dev1", "fleet": FLEET, "seq": 1, "ts": time.time(),
               "msg_id": uuid.uuid4().hex, "key_id": OPERATOR.key_id, "sig": "AAAA", "expires": time.time() + 600,
               "command": "state", "args": {}}
        msg.update(over)
        return msg

    junk_values = [None, True, -1, 2 ** 70, 1e308, "x" * 300, [], {}, [1, {"a": None}], "\u0000\ud7ff"]
    makers = [
        lambda: rng.randbytes(rng.randint(0, 200)),
        lambda: json.dumps(rng.choice(junk_values)).encode(),
        lambda: b"{" * rng.randint(1, 5000),
        lambda: json.dumps(envelope(device="other")).encode(),
        lambda: json.dumps(envelope(fleet="elsewhere")).encode(),
        lambda: json.dumps(envelope(command=rng.choice(["reboot", "", "BENCH", None, 7]))).encode(),
        lambda: json.dumps(envelope(command="bench", args={"min_runs": rng.choice(junk_values)})).encode(),
        lambda: json.dumps(envelope(command="bench", args={rng.choice(["threads", "warmup"]): 0.5})).encode(),
        lambda: json.dumps(envelope(command="bench", args={"variant": "nope", "oops": 1})).encode(),
        lambda: json.dumps(envelope(command="activate", args=rng.choice([{}, {"sha256": 5}, [], "x"]))).encode(),
        lambda: json.dumps(envelope(command="activate", args={"sha256": "0" * 64})).encode(),
        lambda: json.dumps(envelope(**{rng.choice(["seq", "ts", "msg_id", "schema", "device"]): rng.choice(junk_values)})).encode(),
        lambda: json.dumps({k: v for k, v in envelope().items() if k != rng.choice(["seq", "ts", "msg_id"])}).encode(),
        lambda: json.dumps(envelope(schema="edgekit.bench/1")).encode(),
        lambda: json.dumps(envelope(command="rollback")).encode(),
        lambda: json.dumps(envelope()).encode(),
        lambda: b'{"pad": "' + b"a" * messages.MAX_PAYLOAD + b'"}',
        lambda: json.dumps(envelope()).encode().replace(b'"expires": ', b'"expires": 1' + b"0" * 400 + b', "x": '),
        lambda: b'{"seq": 1' + b"0" * 5000 + b"}",
        lambda: json.dumps(envelope()).encode()[: rng.randint(1, 60)],
    ]
    return [rng.choice(makers)() for _ in range(n)]


def test_fuzzed_commands_are_each_refused_unanswered_and_the_agent_stays_up(agents, mosquitto, monitor):
    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    payloads = _fuzz_payloads(1000, random.Random(20261128))
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer")
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    for p in payloads:
        sender.publish(messages.topic(FLEET, "dev1", "cmd"), p, qos=1).wait_for_publish(5)
    sender.disconnect()
    sender.loop_stop()
    with client_for(mosquitto) as client:  # still answers real work, after every fuzzed payload
        assert client.request("dev1", "bench", {"min_runs": 5}, timeout=90)["record"]["runs"] >= 5
        state = client.request("dev1", "state", timeout=30)["result"]
    assert agent.alive() and state["spool"]["refused_commands"] == 1000  # none was the operator's: all refused
    fuzzed_acks = [a for a in monitor.messages["cmd/ack"] if a["command"] not in ("bench", "state") or not a["ok"]]
    assert fuzzed_acks == []  # and none answered: no signed word on unauthenticated input


def test_username_password_acl_and_tls_from_config(tmp_path, digits_artifacts):
    tls = make_tls(tmp_path / "tls")
    acl = f"user dev1\ntopic readwrite edgekit/v1/{FLEET}/dev1/#\nuser ops\ntopic readwrite edgekit/v1/{FLEET}/#\n"
    broker = MosquittoBroker(tmp_path / "broker", users={"dev1": "s3cret-dev", "ops": "s3cret-ops"}, acl=acl, tls=tls).start()
    try:
        (tmp_path / "dev.pass").write_text("s3cret-dev\n")
        (tmp_path / "ops.pass").write_text("s3cret-ops\n")
        agent = AgentProcess(tmp_path, "dev1", broker, digits_artifacts,
                             broker={"username": "dev1", "password_file": str(tmp_path / "dev.pass"),
                                     "tls": {"ca": str(tls.ca)}}).start()
        watcher = mqtt.Client(CallbackAPIVersion.VERSION2)
        watcher.username_pw_set("ops", "s3cret-ops")
        watcher.tls_set(ca_certs=str(tls.ca))
        births = []
        watcher.on_message = lambda _c, _u, m: births.append(json.loads(m.payload))
        watcher.connect(broker.host, broker.port)
        watcher.subscribe(messages.topic(FLEET, "dev1", "status"), qos=1)
        watcher.loop_start()
        try:
            assert wait_until(lambda: births and births[-1]["state"] == "online", 30), agent.log.read_text()
            ops = Broker(host=broker.host, port=broker.port, username="ops", password_file=tmp_path / "ops.pass",
                         tls=TlsConfig(ca=tls.ca))
            with FleetClient(ops, FLEET, "s3cret-ops", signer=OPERATOR, keyring=KEYRING) as client:
                rec = client.request("dev1", "bench", {"min_runs": 5}, timeout=60)["record"]
                assert client.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # TLS too
            assert rec["device"] == "dev1"
            wrong = Broker(host=broker.host, port=broker.port, username="ops", tls=TlsConfig(ca=tls.ca))
            with pytest.raises(AgentError, match="did not accept the connection"):
                with FleetClient(wrong, FLEET, "wrong", signer=OPERATOR, keyring=KEYRING):
                    pass
            plain = Broker(host=broker.host, port=broker.port, username="ops")  # TLS port, no TLS
            with pytest.raises(AgentError, match="did not accept|cannot reach"):
                with FleetClient(plain, FLEET, "s3cret-ops", signer=OPERATOR, keyring=KEYRING):
                    pass
        finally:
            watcher.loop_stop()
            agent.stop()
    finally:
        broker.stop()


def test_edgekit_bench_cli_prints_the_record_and_names_a_silent_device(agents, mosquitto, monitor, run_cli, tmp_path):
    agent = agents("dev1", telemetry_interval_s=0.5)
    assert monitor.wait_for(online("dev1"), 30)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: {mosquitto.port}}}\n"
                     "defaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: dev1, host: 127.0.0.1}\n  - {name: dev2, host: 127.0.0.1}\n")
    share_keys(fleet, agent)
    code, out, err = run_cli("bench", "--fleet", fleet, "--device", "dev1", "--variant", "fp32", "--min-runs", "10", "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["variant"] == "fp32" and rec["runs"] >= 10 and rec["device"] == "dev1"
    code, out, err = run_cli("bench", "--fleet", fleet, "--device", "dev1", "--min-runs", "10")
    assert code == 0 and "latency p50/p90/p99" in out and "simulated" in out and "estimated" in out, out
    # both records are in the fleet's history, where select, fleet status and report read them (they were printed
    # and dropped before); the printed one says where it went
    history = tmp_path / "edgekit-history.db"
    assert f"stored in {history}" in " ".join(out.split()), out
    with Store(history) as db:
        stored = db.bench_records("dev1")
    assert rec["msg_id"] in {r["msg_id"] for r in stored} and len(stored) == 2
    assert {r["variant"] for r in stored} == {"fp32", "int8"}
    code, out, err = run_cli("bench", "--fleet", fleet, "--device", "dev2", "--timeout", "2")
    assert code == 5 and err.strip() == (f"edgekit: error: dev2: no answer to 'bench' within 2 s; is its agent running "
                                         f"and connected to 127.0.0.1:{mosquitto.port}?")
    # telemetry flows on its own, numbered, with the spool's state
    assert monitor.wait_for(lambda m: len(m["telemetry"]) >= 2, 10)
    tel = monitor.messages["telemetry"]
    assert [t["seq"] for t in tel[:2]] == [1, 2] and tel[0]["spool"]["dropped_telemetry"] == 0
    assert tel[0]["current"]["variant"] == "int8" and "load_1m" in tel[0]["conditions"]


def test_a_stopped_agent_leaves_an_offline_status_and_a_killed_one_its_last_will(agents, mosquitto, monitor):
    agent = agents("dev1", broker={"keepalive": 1})
    assert monitor.wait_for(online("dev1"), 30)
    agent.stop()
    assert monitor.wait_for(lambda m: m["status"][-1]["state"] == "offline", 10)
    agent.start()
    assert monitor.wait_for(online("dev1"), 30)
    agent.proc.kill()  # no goodbye: the broker publishes the will after the keepalive lapses
    assert monitor.wait_for(lambda m: m["status"][-1]["state"] == "offline", 15)


def test_after_an_activation_the_store_budget_removes_old_models_and_the_ack_lists_them(agents, mosquitto, monitor, tmp_path):
    agent = agents("dev1", store={"max_store_mb": 0.001})  # far below what the digits variants take
    junk = tmp_path / "old.tflite"
    junk.write_bytes(b"TFL3" + bytes(3000))
    old = agent.store.install(junk, variant="old", model="digits").sha256
    assert monitor.wait_for(online("dev1"), 30)
    with client_for(mosquitto) as client:
        done = client.request("dev1", "activate", {"variant": "fp32", "keep": [agent.sha["dynamic-int8"]]},
                              timeout=60)["result"]
        assert [m["sha256"] for m in done["removed"]] == [old]  # int8 is previous, fp32 current, dynamic-int8 kept
        assert agent.store.describe(old) is None and agent.store.describe(agent.sha["dynamic-int8"]) is not None
        # the kept candidates are remembered: a later activation without 'keep' still spares them
        again = client.request("dev1", "activate", {"variant": "int8"}, timeout=60)["result"]
        assert again["removed"] == [] and agent.store.describe(agent.sha["dynamic-int8"]) is not None


def test_a_command_replayed_after_an_agent_restart_is_not_run_again(agents, mosquitto, monitor):
    """The ids of commands taken persist with the spool: a captured, validly signed command replayed
    after a restart (within its expiry) is counted, not run."""
    from edgekit_protocol import commands

    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    msg = OPERATOR.sign(commands.command(FLEET, "dev1", "rollback", expires=time.time() + 600))
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="replayer")
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        sender.publish(messages.topic(FLEET, "dev1", "cmd"), messages.encode(msg), qos=1).wait_for_publish(5)
        assert monitor.wait_for(lambda m: any(a["cmd_id"] == msg["msg_id"] for a in m["cmd/ack"]), 30)
        assert agent.store.current() == agent.sha["int8"] and agent.store.previous() is None  # nothing to roll back to
        agent.stop()
        agent.start()
        assert monitor.wait_for(lambda m: [s["state"] for s in m["status"]][-1:] == ["online"], 30)
        sender.publish(messages.topic(FLEET, "dev1", "cmd"), messages.encode(msg), qos=1).wait_for_publish(5)
        with client_for(mosquitto) as client:
            state = client.request("dev1", "state", timeout=30)["result"]
    finally:
        sender.disconnect()
        sender.loop_stop()
    assert state["spool"]["replayed_commands"] == 1
    assert [a["cmd_id"] for a in monitor.messages["cmd/ack"]].count(msg["msg_id"]) == 1


def test_commands_taken_before_a_crash_are_answered_after_the_restart_and_never_run_twice(agents, mosquitto, monitor):
    """The agent writes a command to disk before it tells the broker it has it: killed (SIGKILL) while
    one command runs and another waits, after its restart it answers the one that ran "interrupted"
    (it may have taken effect: never run twice) and runs the one that waited; each answered once."""
    from edgekit_protocol import commands

    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    # a bench far longer than the test takes to see both commands on disk and kill the agent, even on a loaded machine
    slow = OPERATOR.sign(commands.command(FLEET, "dev1", "bench", {"min_runs": 5, "min_seconds": 60.0},
                                          expires=time.time() + 600))
    waiting = OPERATOR.sign(commands.command(FLEET, "dev1", "state", expires=time.time() + 600))
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="crash-test")
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        for msg in (slow, waiting):
            sender.publish(messages.topic(FLEET, "dev1", "cmd"), messages.encode(msg), qos=1).wait_for_publish(5)
        assert wait_until(lambda: spool_inbox(agent.root) == 2, 10)  # both on disk, neither answered
        assert wait_until(lambda: spool_inbox(agent.root, started=True) == 1, 30)  # the bench running (a loaded machine
        # can take a while to begin it: killed before, it is run after the restart, rightly, and answered ok)
        agent.proc.kill()
        agent.proc.wait(10)
        assert not any(a["cmd_id"] in (slow["msg_id"], waiting["msg_id"]) for a in monitor.messages["cmd/ack"])
        agent.start()
        answered = lambda m: {a["cmd_id"] for a in m["cmd/ack"]} >= {slow["msg_id"], waiting["msg_id"]}  # noqa: E731
        assert monitor.wait_for(answered, 60), agent.log.read_text()[-2000:]
    finally:
        sender.disconnect()
        sender.loop_stop()
    acks = {a["cmd_id"]: a for a in monitor.messages["cmd/ack"] if a["cmd_id"] in (slow["msg_id"], waiting["msg_id"])}
    assert len([a for a in monitor.messages["cmd/ack"] if a["cmd_id"] in acks]) == 2, acks
    assert not acks[slow["msg_id"]]["ok"] and "interrupted by an agent restart" in acks[slow["msg_id"]]["error"]
    assert acks[waiting["msg_id"]]["ok"] and acks[waiting["msg_id"]]["result"]["current"]["variant"] == "int8"
    assert spool_inbox(agent.root) == 0


def test_a_full_disk_is_answered_reported_and_recovered_from(tmp_path, mosquitto, monitor, digits_artifacts):
    """On a 16 MB tmpfs filled to the last byte, the agent stays up and answers every command: the
    reserve it keeps is freed so the answers can be written, installs/activations/benches are refused
    with "disk full" and how much is free, `current` never moves, the status says full; when space
    returns it recovers on its own and activates again."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    agent = None
    try:
        agent = AgentProcess(disk, "dev1", mosquitto, digits_artifacts, telemetry_interval_s=0.3,
                             store={"min_free_mb": 2, "reserve_mb": 1}).start()
        assert monitor.wait_for(online("dev1"), 30), agent.log.read_text()
        birth = [m for m in monitor.messages["status"] if m["device"] == "dev1"][-1]
        assert birth["disk"]["full"] is False and birth["disk"]["reserve_bytes"] == 1_000_000
        def fill(path):
            with open(path, "wb", buffering=0) as f:  # every last block; unbuffered: nothing left to flush at close
                try:
                    while True:
                        f.write(bytes(1 << 16))
                except OSError:
                    pass

        filler = disk / "filler"
        fill(filler)
        with client_for(mosquitto) as client:
            with pytest.raises(AgentError, match="activate refused: disk full: activate refused; .* MB free under") as act:
                client.request("dev1", "activate", {"variant": "fp32"}, timeout=30)
            assert "free space on the device" in str(act.value)
            assert agent.store.current() == agent.sha["int8"]  # never switched without an answer
            with pytest.raises(AgentError, match="bench refused: disk full: bench refused"):
                client.request("dev1", "bench", {"variant": "int8"}, timeout=30)
            state = client.request("dev1", "state", timeout=30)["result"]
            assert state["disk"]["full"] is True and state["disk"]["reserve_bytes"] == 0  # freed to answer
            assert monitor.wait_for(lambda m: [s for s in m["status"] if s["device"] == "dev1"][-1]["disk"]["full"], 10)
            fill(disk / "filler2")  # and what the reserve gave back is taken too: not even telemetry can be written
            assert wait_until(lambda: "telemetry dropped" in agent.log.read_text(), 10), agent.log.read_text()[-2000:]
            time.sleep(1)
            assert agent.alive(), agent.log.read_text()[-2000:]  # dropped and counted; the agent goes on
            (disk / "filler2").unlink()
            filler.unlink()
            assert monitor.wait_for(lambda m: not [s for s in m["status"] if s["device"] == "dev1"][-1]["disk"]["full"], 15)
            assert client.request("dev1", "activate", {"variant": "fp32"}, timeout=60)["ok"]
            assert agent.store.current() == agent.sha["fp32"]
            assert client.request("dev1", "state", timeout=30)["result"]["disk"]["reserve_bytes"] == 1_000_000
            heard = len(monitor.messages["telemetry"])
            assert monitor.wait_for(lambda m: len(m["telemetry"]) > heard + 2, 10)  # telemetry flows again
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_the_serving_api_follows_every_activation_and_live_figures_come_on_their_own_topic(agents, mosquitto, monitor):
    """An application on the device keeps calling predict() while the operator activates another
    variant: the agent serves the new one before it answers the activation, and reports the live
    figures (requests, service-time percentiles) of the served model on its ``live`` topic, signed by
    the device, numbered apart from telemetry (which no longer carries them)."""
    import numpy as np

    from device_agents.identity import Keyring
    from device_agents.serving import Client

    agent = agents("dev1", telemetry_interval_s=1.0)
    assert monitor.wait_for(online("dev1"), 30)
    x = np.random.default_rng(0).uniform(0, 16, size=(8, 8, 1)).astype(np.float32)
    app = Client(agent.root)
    assert wait_until(lambda: (agent.root / "serve.sock").exists(), 10)
    before = app.predict({"image": x})["output_0"]
    assert app.model == {"sha256": agent.sha["int8"], "variant": "int8"}
    with client_for(mosquitto) as client:
        done = client.request("dev1", "activate", {"variant": "fp32"}, timeout=60)["result"]
    assert done["serving"] == {"sha256": agent.sha["fp32"], "variant": "fp32"}
    for _ in range(20):
        after = app.predict({"image": x})["output_0"]
    assert app.model["variant"] == "fp32" and after.shape == before.shape == (10,)
    app.close()

    def live(m):
        return [x for x in m["live"] if x["device"] == "dev1" and x["requests"]]
    assert monitor.wait_for(lambda m: any(x["model"]["variant"] == "fp32" and x["requests"] >= 20 for x in live(m)), 15)
    figures = [x for x in live(monitor.messages) if x["model"]["variant"] == "fp32"][-1]
    assert figures["source"] == "live" and figures["errors"] == 0 and figures["latency_ms"]["p50"] > 0
    assert "perf_counter_ns" in figures["clock"]
    Keyring({"dev1": agent.signer.public}).verify(figures, "dev1")  # the device's own word
    assert messages.check_body("live", figures) == figures
    seqs = [x["seq"] for x in monitor.messages["live"] if x["device"] == "dev1"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert not [t for t in monitor.messages["telemetry"] if "live" in t]


def test_desired_states_that_are_forged_or_replayed_never_move_the_device(agents, mosquitto, monitor):
    """Only the operator's desired state is taken, only with a revision above the last one taken
    (persisted: a restart does not reopen the door to a replay), and each refusal is counted."""
    from device_agents.identity import Signer
    from edgekit_protocol.desired import Desired

    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)

    def desired(variant: str, revision: int, signer=OPERATOR) -> dict:
        body = Desired(msg_id="", rollout="r", revision=revision, store="http://127.0.0.1:9", model="digits",
                       variant=variant, sha256=agent.sha[variant], bytes=1).body()
        return signer.sign(messages.envelope("desired", FLEET, "dev1", 0, body))

    def publish(msg: dict) -> None:
        sender.publish(messages.topic(FLEET, "dev1", "desired"), messages.encode(msg), qos=1, retain=True).wait_for_publish(5)

    def counters() -> dict:
        with client_for(mosquitto) as client:
            return client.request("dev1", "state", timeout=30)["result"]["spool"]

    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="operator-or-not")
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        old = desired("fp32", 10)
        publish(old)  # installed already: activated at once, no download
        assert wait_until(lambda: agent.store.current() == agent.sha["fp32"], 30)
        assert monitor.wait_for(lambda m: any(r["state"] == "converged" and r["revision"] == 10 for r in m["reported"]), 30)
        publish(desired("dynamic-int8", 11, signer=Signer.generate()))  # not the operator's key
        publish(desired("int8", 12))
        assert wait_until(lambda: agent.store.current() == agent.sha["int8"], 30)
        publish(old)  # a captured, validly signed old revision, replayed
        assert wait_until(lambda: counters()["stale_desired"] == 1, 30)
        assert counters()["refused_commands"] == 1
        agent.stop()
        agent.start()
        assert monitor.wait_for(lambda m: [s["state"] for s in m["status"] if s["device"] == "dev1"][-1:] == ["online"], 30)
        publish(old)  # refused twice more: as the retained message on subscribe, and sent again
        assert wait_until(lambda: counters()["stale_desired"] == 3, 30) and agent.store.current() == agent.sha["int8"]
    finally:
        sender.disconnect()
        sender.loop_stop()
    reported = [r for r in monitor.messages["reported"] if r["device"] == "dev1"]
    assert {r["revision"] for r in reported} == {10, 12} and all(r["state"] == "converged" for r in reported)


def test_a_failed_pull_is_counted_where_telemetry_and_state_carry_the_device_counters(agents, mosquitto, monitor):
    """A pull that fails (here the store refuses the connection; a tampered store's hash mismatch goes the
    same way) was only in the retained `reported` message, which the next report overwrites: nothing in
    the device's counters (state and telemetry `spool`) said it had happened. Now each failed try counts
    in `failed_pulls`, persistently, beside `stale_desired` and `refused_commands`."""
    from edgekit_protocol.desired import Desired

    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket is closed
    body = Desired(msg_id="", rollout="r", revision=1, store=f"http://127.0.0.1:{closed}", model="digits",
                   variant="int8", sha256="ab" * 32, bytes=1000).body()
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="operator")
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        msg = OPERATOR.sign(messages.envelope("desired", FLEET, "dev1", 0, body))
        sender.publish(messages.topic(FLEET, "dev1", "desired"), messages.encode(msg), qos=1, retain=True).wait_for_publish(5)
        assert monitor.wait_for(lambda m: any(r["device"] == "dev1" and r["state"] == "failed" for r in m["reported"]), 30)
        with client_for(mosquitto) as client:
            spool = client.request("dev1", "state", timeout=30)["result"]["spool"]
        assert spool["failed_pulls"] == 1 and spool["stale_desired"] == 0
        assert agent.store.current() != "ab" * 32  # still on its own model
    finally:
        sender.disconnect()
        sender.loop_stop()


def test_an_agent_whose_spool_was_damaged_starts_with_a_new_one_and_says_so(agents, mosquitto, monitor):
    """A spool.db that was no database any more made every start of the agent crash (a loop under its
    supervisor, the device lost until someone logged in). It comes online with a new spool, keeps the
    damaged one, counts it and answers commands."""
    agent = agents("dev1")
    assert monitor.wait_for(online("dev1"), 30)
    agent.stop()
    for leftover in agent.root.glob("spool.db-*"):
        leftover.unlink()
    (agent.root / "spool.db").write_bytes(b"\x00damaged by a power cut " * 4096)
    agent.start()
    assert wait_until(lambda: [s["state"] for s in monitor.messages["status"] if s["device"] == "dev1"][-1:] == ["online"]
                      and len(monitor.messages["status"]) >= 3, 30), agent.log.read_text()[-2000:]
    with client_for(mosquitto) as client:
        state = client.request("dev1", "state", timeout=30)["result"]
    assert state["spool"]["damaged_spools"] == 1 and agent.alive()
    assert len(list(agent.root.glob("spool.db.damaged-*"))) == 1
