"""The host's fleet client and tune's measuring round against an in-memory transport (no broker).

The fake stands where paho's client stands; a scripted "agent" answers each published command
with what a real agent sends (an ack, and for ``bench`` a record), or stays silent.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from device_agents.identity import Keyring, Signer
from edge_kit.errors import AgentError, AgentTimeout, CommandError
from edge_kit.fleet.commands import FleetClient
from edge_kit.loop.tune import _measure
from edge_kit.telemetry.store import Store
from edgekit_protocol import messages
from edgekit_protocol.config import BrokerConfig

FLEET = "f1"
OPERATOR = Signer.generate()
DEVICES = {name: Signer.generate() for name in ("d1", "d2", "d3")}
LATENCY = {q: 1.0 for q in ("p50", "p90", "p99", "mean", "std", "min", "max")}


class FakeTransport:
    """paho's client surface, in memory; ``answer(device, command) -> [(kind, body)]`` plays the agents."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], list[tuple[str, dict[str, Any]]]]):
        self.answer = answer
        self.published: list[dict[str, Any]] = []
        self.on_connect = self.on_message = self.on_subscribe = None
        self.seq = 0

    def connect(self, host: str, port: int, keepalive: int = 30) -> None:
        pass

    def loop_start(self) -> None:  # the network loop: connect, then the SUBACK of what on_connect subscribed
        self.on_connect(self, None, None, SimpleNamespace(is_failure=False), None)
        self.on_subscribe(self, None, None, None, None)

    def subscribe(self, topics: list[tuple[str, int]]) -> None:
        self.topics = topics

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        msg = messages.decode(payload, "cmd")
        Keyring(operators=[OPERATOR.public]).verify(msg, "operator")  # what the agent checks first
        self.published.append(msg)
        for kind, body in self.answer(msg["device"], msg):
            self.seq += 1
            reply = DEVICES[msg["device"]].sign(messages.envelope(kind, FLEET, msg["device"], self.seq, body))
            self.deliver(messages.topic(FLEET, msg["device"], kind), messages.encode(reply))

    def deliver(self, topic: str, payload: bytes) -> None:
        """Hand a message to the client as the broker would."""
        self.on_message(self, None, SimpleNamespace(topic=topic, payload=payload))

    def disconnect(self) -> None:
        pass

    def loop_stop(self) -> None:
        pass


def agent(silent: tuple[str, ...] = (), refuse: tuple[str, ...] = ()):
    """Return an ``answer`` function: a healthy agent per device, except the silent and refusing ones."""

    def answer(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if device in silent:
            return []
        if device in refuse:
            return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": False, "error": "disk full",
                                 "result": {}})]
        if cmd["command"] != "bench":
            return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": True, "result": {"x": 1}})]
        record = messages.envelope("bench", FLEET, device, 1, {
            "variant": "int8", "sha256": cmd["args"].get("sha256") or "c" * 64, "latency_ms": LATENCY, "runs": 10,
            "power": {"measured": False}, "simulated": True})
        return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": "bench", "ok": True,
                             "result": {"bench_msg_id": record["msg_id"]}}), ("bench", {k: v for k, v in record.items()
                                                                                       if k not in ("schema", "device", "fleet", "seq", "ts")})]

    return answer


def client(answer) -> FleetClient:
    return FleetClient(BrokerConfig(), FLEET, transport=FakeTransport(answer), signer=OPERATOR,
                       keyring=Keyring({k: v.public for k, v in DEVICES.items()}, [OPERATOR.public]))


def test_a_request_returns_the_ack_or_raises_what_the_agent_said():
    with client(agent(refuse=("d2",), silent=("d3",))) as c:
        assert c.request("d1", "state")["result"] == {"x": 1}
        with pytest.raises(AgentError, match="d2: state refused: disk full"):
            c.request("d2", "state")
        with pytest.raises(AgentTimeout, match="d3: no answer to 'state' within 0 s"):
            c.request("d3", "state", timeout=0.05)


def test_a_bench_request_waits_for_the_record_the_ack_announces():
    with client(agent()) as c:
        ack = c.request("d1", "bench", {"sha256": "ab" * 32})
        assert ack["record"]["sha256"] == "ab" * 32 and ack["record"]["device"] == "d1"


def test_edgekit_bench_voids_its_command_when_it_stops_waiting(tmp_path, run_cli, monkeypatch):
    """`edgekit bench --timeout 1` gave up, but its command kept the default hour's expiry: queued behind
    other work, the benchmark still ran long after, for nobody."""
    from edge_kit.fleet import commands

    fake = client(agent())
    monkeypatch.setattr(commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: fake))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    sent = time.time()
    code, out, err = run_cli("bench", "--fleet", fleet_file, "--device", "d1", "--timeout", "30", "--json")
    assert code == 0, err
    (cmd,) = fake.client.published
    assert cmd["command"] == "bench" and sent + 30 <= cmd["expires"] <= time.time() + 30


def test_edgekit_bench_json_says_where_the_record_was_stored(tmp_path, run_cli, monkeypatch):
    """The human output ends with `stored in <history>`; --json printed the record alone, so a script could not
    tell which history holds it (the fleet's beside its file, or --history)."""
    from edge_kit.fleet import commands

    fake = client(agent())
    monkeypatch.setattr(commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: fake))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("bench", "--fleet", fleet_file, "--device", "d1", "--timeout", "30", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["history"] == str(tmp_path / "edgekit-history.db") and doc["device"] == "d1"


def test_a_command_the_agent_would_refuse_is_never_sent():
    transport = FakeTransport(agent())
    with FleetClient(BrokerConfig(), FLEET, transport=transport, signer=OPERATOR, keyring=Keyring()) as c:
        with pytest.raises(CommandError, match="min_runs' must be between 1 and 1000000, got 0"):
            c.send("d1", "bench", {"min_runs": 0})
    assert transport.published == []


def test_a_measuring_round_stores_what_came_back_and_names_who_did_not_answer(tmp_path):
    store = Store(tmp_path / "history.db")
    # the silent device first: its missing answer once replaced the round's refused-records dict by None (a name
    # used twice), and the next record stored, or the caller, raised
    wanted = {"d2": [("int8", "c" * 64)], "d1": [("int8", "a" * 64), ("fp32", "b" * 64)], "d3": [("int8", "d" * 64)]}
    with client(agent(silent=("d2",), refuse=("d3",))) as c:
        sent = time.time()
        stored, silent, unstored = _measure(c, store, wanted, {"min_runs": 10}, timeout=0.2)
    assert unstored == {}
    # void once the round gives up (not the default hour): a benchmark queued behind others never runs late
    assert all(sent < cmd["expires"] <= time.time() + 0.2 for cmd in c.client.published)
    assert stored == 2
    assert silent == {"d2": ["int8 (no answer)"], "d3": ["int8 (disk full)"]}
    assert sorted(sha for _, sha in store.latest_bench("d1")) == ["a" * 64, "b" * 64]


def test_only_the_addressed_devices_signed_well_formed_ack_counts():
    """Forged, misaddressed and malformed acks are refused and counted; the real one is taken."""
    held: list[dict[str, Any]] = []

    def slow_agent(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        held.append(cmd)  # answers come later, from the test
        return []

    with client(slow_agent) as c:
        cmd_id = c.send("d1", "state")
        transport = c.client

        def ack(signer: Signer, device: str, **body: Any) -> bytes:
            msg = messages.envelope("cmd/ack", FLEET, device, 1, {"cmd_id": cmd_id, "command": "state", "ok": True,
                                                                   "error": None, "result": {"forged": False}, **body})
            return messages.encode(signer.sign(msg))

        topic = messages.topic(FLEET, "d1", "cmd/ack")
        intruder = Signer.generate()
        transport.deliver(topic, ack(intruder, "d1", result={"forged": True}))  # not d1's key
        transport.deliver(messages.topic(FLEET, "d2", "cmd/ack"), ack(DEVICES["d2"], "d2"))  # d2 was not asked
        transport.deliver(topic, ack(DEVICES["d1"], "d1", result={"forged": True}).replace(b'"ok":true', b'"ok":1'))
        transport.deliver(topic, ack(DEVICES["d1"], "d1", ts=4_102_444_800.0))  # from the future
        transport.deliver(topic, ack(DEVICES["d1"], "d1")[:-9])  # truncated
        assert c.wait_ack(cmd_id, 0.05) is None and len(c.rejected) == 5
        transport.deliver(topic, ack(DEVICES["d1"], "d1"))
        assert c.wait_ack(cmd_id, 1)["result"] == {"forged": False}
    assert held and held[0]["expires"] > held[0]["ts"]  # every command expires


def test_a_record_its_device_signed_but_the_checks_refuse_is_said_at_once_not_waited_for(tmp_path):
    """A bench record signed by its device whose figures the checks refuse (a negative watt figure): tune says
    why at once instead of waiting its whole timeout for 'record did not arrive'. A forged copy of such a
    record, signed by another key, is no such word: the genuine record is still waited for."""
    import time

    def bad_power(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        answers = agent()(device, cmd)
        if cmd["command"] == "bench":
            answers[1][1]["power"] = {"sensor": "ina219", "avg_w": -2.0, "energy_per_inference_mj": -1.0}
        return answers

    store = Store(tmp_path / "h.db")
    with client(bad_power) as c:
        started = time.monotonic()
        stored, silent, _ = _measure(c, store, {"d1": [("int8", "a" * 64)]}, {"min_runs": 10}, timeout=30)
        assert time.monotonic() - started < 5
        assert stored == 0 and silent == {"d1": ["int8 (record refused: bench: power.avg_w is not a non-negative number)"]}
        forged = DEVICES["d2"].sign(messages.envelope("bench", FLEET, "d1", 9, {
            "variant": "int8", "sha256": "b" * 64, "latency_ms": LATENCY, "runs": 10, "simulated": True,
            "power": {"avg_w": -1.0}}))
        c.client.deliver(messages.topic(FLEET, "d1", "bench"), messages.encode(forged))
        assert c.wait_record("d1", forged["msg_id"], 0.2) is None and ("d1", forged["msg_id"]) not in c.refused_records


def test_a_bench_request_whose_record_its_device_signed_but_the_checks_refuse_says_why_at_once():
    """`edgekit bench` and a deploy's health check wait in FleetClient.request: a record its device signed but the
    checks refuse is that device's answer (why, and what to check), not a timeout after the whole wait."""
    def bad_power(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        answers = agent()(device, cmd)
        if cmd["command"] == "bench":
            answers[1][1]["power"] = {"sensor": "ina219", "avg_w": -2.0, "energy_per_inference_mj": -1.0}
        return answers

    with client(bad_power) as c:
        with pytest.raises(AgentError) as caught:
            c.request("d1", "bench", {"sha256": "a" * 64}, timeout=2)
    assert not isinstance(caught.value, AgentTimeout)
    assert str(caught.value) == ("d1: its bench record was refused: bench: power.avg_w is not a non-negative number; "
                                 "check that the device runs edge-kit's agent (edgekit deploy installs it) and that its "
                                 "sensors work")


@pytest.mark.parametrize("command", [["monitor", "--duration", "1"], ["bench", "--device", "d1"]])
def test_an_unreachable_broker_is_one_line_saying_what_to_check(tmp_path, run_cli, command):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli(*command, "--fleet", fleet_file, "--json")
    assert code == 5
    assert err == ("edgekit: error: cannot reach the MQTT broker at 127.0.0.1:1 (Connection refused); "
                   "check broker.host/port in the fleet file and that the broker runs\n")
    assert json.loads(out)["exit_code"] == 5


def test_a_metrics_port_in_use_or_out_of_range_is_one_line_exit_2(tmp_path, run_cli):
    import socket

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli("monitor", "--fleet", fleet_file, "--metrics-port", port, "--duration", "1", "--json")
    assert code == 2
    assert json.loads(out)["error"] == (f"--metrics-addr 127.0.0.1 --metrics-port {port}: cannot serve /metrics there "
                                        "(Address already in use); choose a free port or another address")
    code, _, err = run_cli("monitor", "--fleet", fleet_file, "--metrics-port", "99999", "--duration", "1")
    assert code == 2 and err.startswith("edgekit: error: Invalid value for '--metrics-port'") and err.count("\n") == 1


def _offline_monitor(tmp_path, monkeypatch, stats=None, alerts_raised: int = 0, on_start=None, carried_over=(),
                     retained_leftovers=(), notes=()):
    """Replace the monitor with one that needs no broker (``stats``, ``alerts_raised``: what it says it saw;
    ``carried_over``: the open alerts it found at start; ``on_start``: called as it starts) and return a fleet file
    for it."""
    from edge_kit.telemetry import monitor as monitor_module

    class OfflineMonitor:
        def __init__(self, *_args, **_kwargs):
            self.stats = stats or monitor_module.MonitorStats()
            self.alerts, self.alerts_raised, self.failed, self.over_budget, self.constraints = [], alerts_raised, None, {}, {}
            self.carried_over, self.carried_over_total = list(carried_over), len(carried_over)
            self.retained_leftovers = set(retained_leftovers)
            self.notes, self.notes_raised = list(notes), len(notes)  # what it could not judge (no fp32 accuracy)

        def alert_states(self):
            return {}

        def start(self):
            if on_start is not None:
                on_start()

        def stop(self):
            pass

    monkeypatch.setattr(monitor_module, "Monitor", OfflineMonitor)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    return fleet_file


def test_metrics_port_0_serves_on_a_free_port_and_says_which(tmp_path, run_cli, monkeypatch):
    """`monitor --metrics-port 0` was refused (its range started at 1): 0 means a free port, the monitor serves
    /metrics there and says which (stderr with --json, as it runs; the summary's "metrics" too)."""
    import urllib.request

    from edge_kit.telemetry import metrics as metrics_module

    servers, scraped = [], []
    serve = metrics_module.FleetMetrics.serve
    monkeypatch.setattr(metrics_module.FleetMetrics, "serve", lambda *a, **k: servers.append(serve(*a, **k)) or servers[-1])

    def scrape():  # as the monitor starts
        url = f"http://127.0.0.1:{servers[-1].server_port}/metrics"
        scraped.append(urllib.request.urlopen(url, timeout=10).read().decode())

    fleet_file = _offline_monitor(tmp_path, monkeypatch, on_start=scrape)
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--metrics-port", "0", "--duration", "0", "--json")
    assert code == 0, err
    port = servers[-1].server_port
    assert port > 0 and "edgekit_" in scraped[-1]
    assert err == f"edgekit: Prometheus metrics at http://127.0.0.1:{port}/metrics\n"
    assert json.loads(out)["metrics"] == f"http://127.0.0.1:{port}/metrics"
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--metrics-port", "0", "--duration", "0")
    assert code == 0 and err == "", err
    assert f"Prometheus metrics at http://127.0.0.1:{servers[-1].server_port}/metrics\n" in out


def test_monitor_without_json_ends_with_what_it_stored(tmp_path, run_cli, monkeypatch):
    """`edgekit monitor --duration N` printed its table and stopped without a word on what it had stored (only
    --json said), its last line cut off without a newline in a log."""
    from edge_kit.telemetry import monitor as monitor_module

    seen = monitor_module.MonitorStats(received=9, stored=6, duplicates=2, invalid=1, gaps=1)  # no broker here
    # an alert an earlier run wrote and died before printing (the history's open alerts at start)
    carried = [{"device": "d1", "kind": "offline", "subject": "", "raised_at": 1_700_000_000.0, "cleared_at": None,
                "cleared_why": None, "detail": "d1 went offline [/]", "still_open": True}]
    fleet_file = _offline_monitor(tmp_path, monkeypatch, stats=seen, alerts_raised=3, carried_over=carried)
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "0")
    assert code == 0, err
    assert "\nstored 6 of 9 messages" in out, out  # on a line of its own, not glued to the table's last line in a log
    assert "alert carried over (raised " in out and ", still holds): d1 went offline [/]\n" in out, out  # shown, marked
    assert out.endswith("\n") and " ".join(out.split()).endswith(
        f"stored 6 of 9 messages received (2 duplicates, 1 refused, 0 over budget, 1 sequence gaps, 3 alerts) in "
        f"{tmp_path.resolve() / 'edgekit-history.db'}")


def test_monitor_s_last_line_says_what_it_dropped_without_a_refusal_or_an_alert(tmp_path, run_cli, monkeypatch):
    """What a revoked device left at the broker (or a stolen revoked key signed with a time before its revocation) is
    dropped unrefused, and benchmarks breaking the constraints past a device's 32 variants are not alerted one by one:
    both were counted only in the --json summary, the line a run ends with never said so."""
    from edge_kit.telemetry import monitor as monitor_module

    seen = monitor_module.MonitorStats(received=5, stored=1, left_by_revoked=3, breaking_not_alerted=1)
    fleet_file = _offline_monitor(tmp_path, monkeypatch, stats=seen, alerts_raised=1)
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "0")
    assert code == 0, err
    assert " ".join(out.split()).endswith(
        "stored 1 of 5 messages received (0 duplicates, 0 refused, 0 over budget, 0 sequence gaps, 3 left by revoked "
        "devices (signed before their revocation: dropped, not stored), 1 benchmarks breaking constraints not alerted "
        f"(past a device's 32 variants), 1 alerts) in {tmp_path.resolve() / 'edgekit-history.db'}"), out


def test_monitor_names_the_command_that_clears_what_a_revoked_device_left_retained(tmp_path, run_cli, monkeypatch):
    """A revoked device's last will, published retained by a broker restarted after `fleet revoke` cleared its topics,
    stays on the broker (handed to every receiver that subscribes) until it is cleared again: the monitor dropped it
    and counted it, and never said how to remove it. Its summary now names the command, and --json the devices."""
    from edge_kit.telemetry import monitor as monitor_module

    seen = monitor_module.MonitorStats(received=2, stored=1, left_by_revoked=1)
    fleet_file = _offline_monitor(tmp_path, monkeypatch, stats=seen, retained_leftovers=("d1",))
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "0")
    assert code == 0, err
    assert " ".join(out.split()).endswith(
        "d1: revoked, and the broker still holds what it left retained (its last will, sent as the broker restarted): "
        f"`edgekit fleet revoke d1 --fleet {fleet_file}` clears it"), out
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "0", "--json")
    assert code == 0 and json.loads(out)["retained_by_revoked"] == ["d1"], out


def test_what_a_flood_publishes_is_counted_but_kept_in_bounded_memory(monkeypatch):
    """Every refused message's reason, every status and every bench record was kept in lists for the whole
    session: a rollout or tune running for hours under a flood of garbage (or a compromised device's
    signed chatter) grew without end. The newest are kept, refusals all counted."""
    from edge_kit.fleet import commands as fleet_commands

    with client(agent()) as c:
        transport = c.client
        for i in range(fleet_commands.MAX_REJECTED + 500):
            transport.deliver(messages.topic(FLEET, f"x{i}", "cmd/ack"), b'{"garbage": %d}' % i)
        assert c.rejected_count == fleet_commands.MAX_REJECTED + 500
        assert len(c.rejected) == fleet_commands.MAX_REJECTED and "x1499/" in c.rejected[-1]
        for i in range(fleet_commands.MAX_STATUS * 3):
            msg = DEVICES["d1"].sign(messages.envelope("status", FLEET, "d1", i, {"state": "online"}))
            transport.deliver(messages.topic(FLEET, "d1", "status"), messages.encode(msg))
        assert len(c.statuses()) == fleet_commands.MAX_STATUS and c.statuses()[-1]["seq"] == i
        assert c.wait_online("d1", 0.0, 0.1)["state"] == "online"
        assert c.request("d2", "bench", {"sha256": "a" * 64}, timeout=2)["record"]["device"] == "d2"
        monkeypatch.setattr(fleet_commands, "MAX_RECORDS", 20)
        sent = []
        for i in range(50):  # bench records nobody asked for, signed by their device
            msg = DEVICES["d3"].sign(messages.envelope("bench", FLEET, "d3", i, {
                "variant": "int8", "sha256": "b" * 64, "latency_ms": LATENCY, "runs": 10,
                "power": {"measured": False}, "simulated": True}))
            transport.deliver(messages.topic(FLEET, "d3", "bench"), messages.encode(msg))
            sent.append(msg["msg_id"])
        assert list(c.records) == [("d3", m) for m in sent[-20:]]


def test_a_replayed_old_online_status_is_not_taken_for_a_restarted_agent():
    """wait_online took any online status received after the restart as the new agent's: an old signed one,
    replayed by anyone holding the device's broker password, hid an agent that never came back (the deploy
    reported it healthy). Now it must beat every status seen before: a higher seq or a later start."""
    import time as _time

    def status(seq: int, started: float) -> bytes:
        msg = DEVICES["d1"].sign(messages.envelope("status", FLEET, "d1", seq, {"state": "online", "started": started}))
        return messages.encode(msg)

    with client(agent()) as c:
        topic = messages.topic(FLEET, "d1", "status")
        old = [status(3, 1000.0), status(4, 1000.0)]
        for payload in old:
            c.client.deliver(topic, payload)  # the retained one, at subscribe time
        since = _time.time()
        _time.sleep(0.01)
        c.client.deliver(topic, old[0])  # replayed after the restart
        assert c.wait_online("d1", since, 0.05) is None
        c.client.deliver(topic, status(5, 1000.0))  # the restarted agent (same clock reading: seq is higher)
        assert c.wait_online("d1", since, 1)["seq"] == 5
        since = _time.time()
        _time.sleep(0.01)
        c.client.deliver(topic, status(1, 2000.0))  # a re-imaged device: its seq starts again, its start is later
        assert c.wait_online("d1", since, 1)["seq"] == 1


def test_an_agent_numbering_in_a_new_epoch_on_an_older_clock_is_taken_for_a_restarted_one():
    """An agent that was running when its device lost power numbers in a new epoch from seq 1 at its next start, and a
    Pi without a real-time clock restores an older time: its first status was neither higher-numbered nor started
    later than the will of the run before, and wait_online waited its whole timeout (the deploy failed an agent that
    was online). A status of an epoch not seen before is a new start; its seqs are then compared within that epoch,
    and a replayed status of an epoch seen before still proves nothing."""
    import time as _time

    def status(seq: int, started: float, epoch: str, state: str = "online") -> bytes:
        msg = DEVICES["d1"].sign(messages.envelope("status", FLEET, "d1", seq, {"state": state, "started": started},
                                                   epoch=epoch))
        return messages.encode(msg)

    a, b = "a" * 15 + "1", "b" * 15 + "1"
    with client(agent()) as c:
        topic = messages.topic(FLEET, "d1", "status")
        old_online = status(499, 2000.0, a)
        c.client.deliver(topic, old_online)
        c.client.deliver(topic, status(500, 2000.0, a, "offline"))  # its will, retained when the power went
        since = _time.time()
        _time.sleep(0.01)
        c.client.deliver(topic, old_online)  # a replay of its epoch: nothing new
        assert c.wait_online("d1", since, 0.05) is None
        c.client.deliver(topic, status(1, 1500.0, b))  # after the power cut: a new epoch, an older clock
        assert c.wait_online("d1", since, 1)["seq"] == 1
        since = _time.time()
        _time.sleep(0.01)
        c.client.deliver(topic, status(1, 1500.0, b))  # replayed: nothing new
        assert c.wait_online("d1", since, 0.05) is None
        c.client.deliver(topic, status(3, 1500.0, b))  # restarted within epoch b (its clock still behind)
        assert c.wait_online("d1", since, 1)["seq"] == 3


def _acks_with(result: dict[str, Any], **ack: Any):
    """Return an ``answer``: a compromised d1 whose every ack is ok with ``result`` (and ``ack``'s fields), others
    healthy agents."""
    def answer(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if device != "d1":
            return agent()(device, cmd)
        return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": True, "result": result, **ack})]
    return answer


@pytest.mark.parametrize("result", [{}, {"bench_msg_id": ["x"]}, {"bench_msg_id": 7}, {"bench_msg_id": None}])
def test_a_bench_ack_that_names_no_record_is_the_devices_error_not_a_crash(result, tmp_path, run_cli, monkeypatch):
    """A device signs whatever it likes: an ack ``ok`` whose result lacks ``bench_msg_id`` (or holds a list there)
    raised KeyError or TypeError in the client, a traceback from `edgekit bench` and a "please report it" failure
    in a deploy's health check. Now it is one line naming the device, exit 5."""
    from edge_kit.fleet import commands as fleet_commands

    with client(_acks_with(result)) as c:
        with pytest.raises(AgentError, match="d1: its answer to 'bench' names no record"):
            c.request("d1", "bench", {}, timeout=1)
    fake = client(_acks_with(result))
    monkeypatch.setattr(fleet_commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: fake))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("bench", "--fleet", fleet_file, "--device", "d1", "--timeout", "5")
    assert code == AgentError.exit_code and "Traceback" not in err
    assert err.strip().splitlines() == [f"edgekit: error: d1: its answer to 'bench' names no record (bench_msg_id is "
                                        f"{type(result.get('bench_msg_id')).__name__}, not text); check that the device "
                                        "runs edge-kit's agent"]


def test_a_device_whose_ack_names_another_devices_record_gets_no_record(tmp_path):
    """A compromised d1 answers a benchmark with the msg_id of d2's genuine record (seen on the broker, or guessed):
    that record was taken as d1's, passing d1's health check with d2's figures and storing them in d1's round.
    A record counts only when the device that acked published it."""
    store = Store(tmp_path / "h.db")
    with client(agent()) as c:
        theirs = c.request("d2", "bench", {"sha256": "a" * 64})["record"]
        c.client.answer = _acks_with({"bench_msg_id": theirs["msg_id"]})
        with pytest.raises(AgentTimeout, match="d1: the bench record announced in the ack did not arrive"):
            c.request("d1", "bench", {"sha256": "a" * 64}, timeout=0.3)
        stored, silent, _ = _measure(c, store, {"d1": [("int8", "a" * 64)]}, {"min_runs": 10}, timeout=0.3)
    assert stored == 0 and silent == {"d1": ["int8 (record did not arrive)"]}
    assert store.latest_bench("d1") == {}


def test_a_refused_ack_error_is_cut_before_anyone_quotes_it():
    """An ack's ``error`` is the device's text, up to the payload's 64 KiB (or not text at all): it reached a
    deploy's table cell, a rollout's history and the error line whole. It is cut as it arrives."""
    from edgekit_protocol.desired import MAX_ERROR_CHARS

    def shouting(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": False, "error": "E" * 60_000,
                             "result": {}})]

    with client(shouting) as c:
        with pytest.raises(AgentError) as caught:
            c.request("d1", "state")
    said = str(caught.value)
    assert said.startswith("d1: state refused: EEE") and said.endswith("... (60,000 characters)")
    assert len(said) < MAX_ERROR_CHARS + 60


def test_a_device_answering_state_with_an_odd_code_manifest_misses_the_rotation_alone(tmp_path, monkeypatch):
    """`edgekit keys rotate` asks every device for its code manifest to re-sign it. A compromised device answering
    ``code: "x"`` raised AttributeError in the host: the rotation stopped for the whole fleet, every time it ran.
    That device now misses it with the reason; the others take its first step."""
    from edge_kit.fleet import commands as fleet_commands
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.rotate import rotate_operator_key

    def answer(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        result = {"code": "x"} if device == "d1" and cmd["command"] == "state" else {"code": None}
        return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": True, "result": result})]

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n  - {name: d2, host: 127.0.0.2}\n")
    monkeypatch.setattr(fleet_commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: client(answer)))
    _, _, switched, out = rotate_operator_key(load_fleet(fleet_file), timeout=2)
    assert not switched and [(r.device, r.outcome) for r in out] == [("d1", "missed"), ("d2", "both")]
    assert out[0].reason.startswith("its answer to 'state' holds a str where its code manifest goes, not an object")


@pytest.mark.parametrize("force", [False, True])
def test_a_rotation_with_devices_offline_still_gives_the_online_one_the_new_key(force, tmp_path, monkeypatch):
    """`edgekit keys rotate` waited up to --timeout for each device's answer in turn, while every command it sent
    expired 3 timeouts after the first: with three devices or more offline, the online one was sent the new key list after
    its expiry and refused it ("expired"), and with --force the host switched to a key no device pinned (the whole
    fleet out of reach over MQTT). Each step now waits --timeout in all."""
    from edge_kit.fleet import commands as fleet_commands
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.fleet.rotate import rotate_operator_key

    def answer(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if device != "d1":
            return []
        if time.time() > cmd["expires"]:  # what the agent answers a command it could run only after its expiry
            return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": False,
                                 "error": "expired 0.1 s before it could run (the sender stopped waiting); not run",
                                 "result": {}})]
        return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": True, "result": {"code": None}})]

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n" + "".join(f"  - {{name: d{i}, host: 127.0.0.{i}}}\n" for i in range(1, 6)))
    monkeypatch.setattr(fleet_commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: client(answer)))
    _, _, switched, out = rotate_operator_key(load_fleet(fleet_file), timeout=1.0, force=force)
    assert switched is force
    assert [(r.device, r.outcome) for r in out] == [("d1", "rotated" if force else "both"), ("d2", "missed"),
                                                    ("d3", "missed"), ("d4", "missed"), ("d5", "missed")], out


@pytest.mark.parametrize("result", [{"x": 1}, {"shadow": "fp32", "serving": ["int8"]},
                                    {"shadow": {"variant": "v" * 60_000}, "serving": {"variant": "int8"}}])
def test_edgekit_shadow_shows_an_answer_of_another_shape_without_a_traceback(result, tmp_path, run_cli, monkeypatch):
    """`edgekit shadow` printed ``result['shadow']['variant']`` of the device's ack: an ok answer of another shape
    was a KeyError or TypeError traceback. What the device did not name is shown as ``?``; a name of 60,000
    characters was printed whole, and is cut as `fleet status` cuts it."""
    from edge_kit.fleet import commands as fleet_commands

    monkeypatch.setattr(fleet_commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: client(_acks_with(result))))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n")
    code, out, err = run_cli("shadow", "--fleet", fleet_file, "--device", "d1", "--variant", "fp32")
    assert code == 0, err
    if "variant" in result.get("shadow", {}):
        assert out.startswith(f"d1: {'v' * 128}... (60,000 characters) runs beside int8 on 10% of live requests"), out
        return
    assert out.startswith("d1: ? runs beside ? on 10% of live requests")


def test_a_topic_that_is_not_utf8_is_refused_and_counted_not_raised_in_the_network_thread():
    """paho decodes a topic strictly when it is read; a broker that does not check topics (Mosquitto does) can hand
    one that is not UTF-8 to the client's wildcard subscription, and the UnicodeDecodeError left the callback (its
    handler read the topic again), which paho raises again in its network thread: that thread ended and the
    command waited for answers that could no longer arrive. Now it is refused and counted, the bad byte shown."""
    from paho.mqtt.client import MQTTMessage

    with client(agent()) as c:
        message = MQTTMessage(mid=1, topic=f"edgekit/v1/{FLEET}/d1\xff/status".encode("latin-1"))
        message.payload = b"{}"
        c._on_message(None, None, message)  # paho's network thread calls it
        assert c.rejected_count == 1 and c.rejected[0].startswith(f"edgekit/v1/{FLEET}/d1\\xff/status: ")
        assert c.request("d1", "state")["result"] == {"x": 1}


BAD_SHA = "e" * 64  # the record the fake history below refuses for what it holds
_SQLITE_WRITE = Store._write_batch


def _refuse_bad_sha(self, statements):
    """A history that refuses, for what it holds, any batch with a bench record of :data:`BAD_SHA` (what SQLite does
    with an integer beyond 64 bits, PostgreSQL with a NUL, a LATIN1 database with a character it lacks)."""
    from edge_kit.errors import HistoryRecordError

    if any(BAD_SHA in row for _sql, rows in statements for row in rows):
        raise HistoryRecordError(f"the history file {self.where} refused a record (a value it cannot hold): it cannot "
                                 "be stored as it is; the others are")
    return _SQLITE_WRITE(self, statements)


class RefusingStore(Store):
    """The SQLite history, refusing the records of :data:`BAD_SHA` (see :func:`_refuse_bad_sha`)."""

    _write_batch = _refuse_bad_sha


def _invalid(store: Store) -> list[tuple[str, str, bytes]]:
    return [(t, r, bytes(p)) for t, r, p in store._rows("SELECT topic, reason, payload FROM invalid")]


def test_a_measurement_the_history_refuses_is_refused_alone_and_the_round_goes_on(tmp_path):
    """The history refused d1's int8 record for what it holds: tune stopped with exit 6, d2 and d3 unmeasured and
    d1's fp32 record unstored. Now that record is refused (kept as invalid, said under d1) and the rest stored."""
    store = RefusingStore(tmp_path / "history.db")
    wanted = {"d1": [("int8", BAD_SHA), ("fp32", "b" * 64)], "d2": [("int8", "c" * 64)], "d3": [("int8", "d" * 64)]}
    with client(agent()) as c:
        stored, silent, refused = _measure(c, store, wanted, {"min_runs": 10}, timeout=5)
    assert stored == 3 and silent == {}
    assert list(refused) == ["d1"] and len(refused["d1"]) == 1
    assert refused["d1"][0].startswith("bench int8 (refused by the history: ") and "refused a record" in refused["d1"][0]
    assert sorted(sha for _, sha in store.latest_bench("d1")) == ["b" * 64]
    assert [sha for _, sha in store.latest_bench("d2")] == ["c" * 64] and store.latest_bench("d3")
    ((topic, reason, payload),) = _invalid(store)  # nothing lost: kept as received, with why
    assert topic == "edgekit/v1/f1/d1/bench" and "refused a record" in reason and json.loads(payload)["sha256"] == BAD_SHA


def test_a_health_benchmark_the_history_refuses_is_refused_alone_and_the_others_stored(tmp_path, monkeypatch):
    """tune's activation stored each health benchmark with ``store.add``: one the history refused stopped tune, the
    other devices' health benchmarks and the statuses unstored."""
    from edge_kit.fleet.deploy import DeviceResult, GroupResult
    from edge_kit.loop import tune as tn

    def health(device: str, sha: str) -> dict[str, Any]:
        return DEVICES[device].sign(messages.envelope("bench", FLEET, device, 1, {
            "variant": "int8", "sha256": sha, "latency_ms": LATENCY, "runs": 10, "simulated": True}))

    results = [DeviceResult(device="d1", status="succeeded", sha256=BAD_SHA, health=health("d1", BAD_SHA)),
               DeviceResult(device="d2", status="succeeded", sha256="c" * 64, health=health("d2", "c" * 64))]
    monkeypatch.setattr(tn, "deploy", lambda *_a, **_k: GroupResult(results))
    store = RefusingStore(tmp_path / "history.db")
    current: dict[str, str | None] = {}
    unstored: dict[str, list[str]] = {}
    opts = tn.TuneOptions(tmp_path)
    tn._activate(None, [], {"d1": "int8", "d2": "int8"}, opts, store, current, None, unstored)
    assert list(unstored) == ["d1"] and unstored["d1"][0].startswith("bench int8 (refused by the history: ")
    assert [sha for _, sha in store.latest_bench("d2")] == ["c" * 64] and store.latest_bench("d1") == {}
    assert current == {"d1": BAD_SHA, "d2": "c" * 64} and len(_invalid(store)) == 1


def _fleet_file(tmp_path):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n  - {name: d2, host: 127.0.0.1}\n")
    return fleet_file


@pytest.mark.parametrize("as_json", [False, True])
def test_edgekit_bench_says_the_history_refused_its_record_and_keeps_it(tmp_path, run_cli, monkeypatch, as_json):
    """`edgekit bench` stopped with exit 6 and the measurement was gone. Now the record is shown, kept as invalid, the
    refusal said in one line naming the device (--json: ``history_refused``), exit 4."""
    from edge_kit.fleet import commands

    fake = client(lambda device, cmd: agent()(device, {**cmd, "args": {**cmd["args"], "sha256": BAD_SHA}}))
    monkeypatch.setattr(commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: fake))
    monkeypatch.setattr(Store, "_write_batch", _refuse_bad_sha)
    fleet_file = _fleet_file(tmp_path)
    code, out, err = run_cli("bench", "--fleet", fleet_file, "--device", "d1", "--variant", "int8", *(["--json"] * as_json))
    assert code == 4, (out, err)
    assert "Traceback" not in err
    if as_json:
        data = json.loads(out)
        assert data["sha256"] == BAD_SHA and "refused a record" in data["history_refused"]["d1"][0]
    else:
        assert "d1: not stored: bench int8 (refused by the history: " in " ".join(out.split())
    db = Store(tmp_path / "edgekit-history.db")
    assert any(json.loads(p).get("sha256") == BAD_SHA for _t, _r, p in _invalid(db))


def test_a_canary_deploy_stores_the_health_benchmarks_the_history_takes_and_names_the_refused_one(tmp_path, run_cli,
                                                                                                monkeypatch):
    """`deploy --canary` stored the canaries' health benchmarks in one batch: one the history refused lost them all
    and ended the deploy with exit 6 after its table. Now that one is refused alone (kept as invalid, said under its
    device, in --json ``history_refused``), the others stored, exit 4."""
    from edge_kit import manifest
    from edge_kit.fleet.deploy import DeviceResult, GroupResult
    from edge_kit.loop import rollout

    def health(device: str, sha: str) -> dict[str, Any]:
        return DEVICES[device].sign(messages.envelope("bench", FLEET, device, 1, {
            "variant": "int8", "sha256": sha, "latency_ms": LATENCY, "runs": 10, "simulated": True}))

    group = GroupResult([DeviceResult(device="d1", status="succeeded", health=health("d1", BAD_SHA)),
                         DeviceResult(device="d2", status="succeeded", health=health("d2", "c" * 64))])
    monkeypatch.setattr(manifest, "read_manifest", lambda *_a, **_k: None)
    monkeypatch.setattr(rollout, "rollout", lambda *_a, **_k: group)
    monkeypatch.setattr(Store, "_write_batch", _refuse_bad_sha)
    (tmp_path / "art").mkdir()
    code, out, err = run_cli("deploy", "--fleet", _fleet_file(tmp_path), "--artifacts", tmp_path / "art", "--canary", "50%",
                             "--json")
    assert code == 4, (out, err)
    data = json.loads(out)
    assert list(data["history_refused"]) == ["d1"] and "refused a record" in data["history_refused"]["d1"][0]
    db = Store(tmp_path / "edgekit-history.db")
    assert [sha for _, sha in db.latest_bench("d2")] == ["c" * 64] and db.latest_bench("d1") == {}
    assert len(_invalid(db)) == 1
    code, out, err = run_cli("deploy", "--fleet", _fleet_file(tmp_path), "--artifacts", tmp_path / "art", "--canary", "50%")
    assert code == 4 and "d1: history refused bench int8 (refused by the history: " in " ".join(out.split()), (out, err)


def test_a_command_over_the_payload_limit_is_refused_in_one_line_and_nothing_is_sent():
    """A command over the 64 KiB every agent takes (`edgekit bench --variant` of 70,000 characters) was published: the
    broker (max_packet_size) cut the host off, paho reconnected and sent it again, for ever, and the command waited
    out its timeout to say 'no answer'. Now it is refused before it is published, naming the device, the command,
    the size and the limit."""
    from edgekit_protocol.errors import PayloadTooLarge

    with client(agent()) as c:
        with pytest.raises(PayloadTooLarge, match=r"^d1: the bench command of 70,[0-9]{3} bytes is over the protocol's "
                                                  r"65,536-byte limit: not sent; shorten its arguments$"):
            c.request("d1", "bench", {"variant": "x" * 70_000}, timeout=30)
        assert c.client.published == [] and c.sent == {}
        assert c.request("d1", "bench", {"variant": "int8"})["record"]["device"] == "d1"  # the session goes on


def test_every_desired_state_the_rules_allow_fits_the_payload_limit_and_a_larger_one_is_not_published():
    """A desired state within parse_desired's rules (names of 512 characters at most, a model's 128, 256 sha256s to keep) is at
    most ~21 KB signed: a rollout cannot meet the limit. publish_desired checks all the same, before publishing."""
    from edgekit_protocol.desired import (
        MAX_NAME_CHARS,
        MAX_REVISION,
        Desired,
        parse_desired,
    )
    from edgekit_protocol.errors import PayloadTooLarge

    long = "x" * MAX_NAME_CHARS
    most = Desired(msg_id="", rollout=long, revision=MAX_REVISION, store="http://" + "s" * (MAX_NAME_CHARS - 7),
                   model="m" * 128, variant=long, sha256="a" * 64, bytes=2 ** 40 - 1, eval_sha256="b" * 64,
                   eval_bytes=2 ** 40 - 1, keep=tuple(f"{i:064x}" for i in range(256)))
    published = []
    with client(agent()) as c:
        c.client.publish = lambda topic, payload, qos=0, retain=False: published.append(payload)
        parse_desired({**c.publish_desired(most, "d1"), "msg_id": "m"})  # the agent takes it
        assert len(published[0]) < messages.MAX_PAYLOAD // 3
        too_big = Desired(**{**vars(most), "keep": most.keep * 4})  # past the rules: only a bug could build it
        with pytest.raises(PayloadTooLarge, match=r"^d1: the desired state of rollout x{60} of [0-9,]+ bytes is over"):
            c.publish_desired(too_big, "d1")
    assert len(published) == 1


def test_edgekit_bench_with_a_command_over_the_payload_limit_stops_in_one_line_exit_2(tmp_path, run_cli, monkeypatch):
    from edge_kit.fleet import commands

    fake = client(agent())
    monkeypatch.setattr(commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: fake))
    code, out, err = run_cli("bench", "--fleet", _fleet_file(tmp_path), "--device", "d1", "--variant", "x" * 70_000,
                             "--timeout", "30")
    assert code == 2 and err.count("\n") == 1, (out, err)
    assert "d1: the bench command of 70," in err and "65,536-byte limit: not sent" in err
    assert fake.client.published == []


def test_keys_rotate_leaves_a_revoked_device_out_and_switches_without_it(tmp_path, monkeypatch, run_cli):
    """`keys rotate` asked every device of the fleet file, a revoked one too: its answers are refused (or come from a
    thief's device holding a key of its own), so it missed the first step and the switch waited for it for good,
    unless --force; and the line said to deploy to it, which the deploy refuses. A revoked device is now not asked,
    listed `revoked`, and the others switch."""
    from edge_kit.fleet import commands as fleet_commands
    from edge_kit.fleet.inventory import load_fleet

    asked: list[str] = []

    def answer(device: str, cmd: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        asked.append(device)
        return [("cmd/ack", {"cmd_id": cmd["msg_id"], "command": cmd["command"], "ok": True, "result": {"code": None}})]

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n  - {name: d2, host: 127.0.0.2}\n")
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({name: signer.public for name, signer in DEVICES.items() if name in ("d1", "d2")})
    keys.revoke("d2", "stolen")
    monkeypatch.setattr(fleet_commands.FleetClient, "of", classmethod(lambda cls, fleet, **kw: client(answer)))
    code, out, err = run_cli("keys", "rotate", "--fleet", fleet_file, "--timeout", "2", "--json")
    assert code == 0, (out, err)
    done = json.loads(out)
    assert done["switched"] and {d["device"]: d["outcome"] for d in done["devices"]} == {"d1": "rotated", "d2": "revoked"}
    assert set(asked) == {"d1"}


def test_bench_and_shadow_to_a_revoked_device_are_refused_at_once_naming_when_and_the_way_back(tmp_path, monkeypatch,
                                                                                              run_cli):
    """`edgekit bench` and `shadow` to a device `fleet revoke` took back sent their command and waited their whole
    timeout for an answer every receiver refuses (signed by the revoked key, or by a thief's own). FleetClient.send, the
    one place every host command goes through, now refuses such a device before sending: one line naming it, when it
    was revoked and how to readmit it, exit 2. A device re-keyed since (`deploy --new-key`) is asked again."""
    from edge_kit.fleet import commands as fleet_commands
    from edge_kit.fleet.inventory import load_fleet

    stolen = Signer.generate()

    class Silent(FakeTransport):  # whatever a revoked device answers is refused: none is played
        def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
            self.published.append(messages.decode(payload, "cmd"))

    transport = Silent(agent())
    monkeypatch.setattr(fleet_commands, "make_client", lambda *a, **k: transport)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: 1}}\ndefaults: {{user: edgekit, profile: rpi4}}\n"
                          "devices:\n  - {name: d1, host: 127.0.0.1}\n  - {name: d2, host: 127.0.0.2}\n")
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({"d1": DEVICES["d1"].public, "d2": stolen.public})
    keys.revoke("d2", "stolen")
    started = time.monotonic()
    for args in (("bench", "--device", "d2", "--timeout", "3"), ("shadow", "--device", "d2", "--variant", "fp32")):
        code, out, err = run_cli(*args, "--fleet", fleet_file)
        assert code == 2 and err.count("\n") == 1, (args, out, err)
        assert err.startswith(f"edgekit: error: d2: its key {stolen.key_id} was revoked on ") and " (stolen): '" in err, err
        assert "not sent" in err and "`edgekit deploy --new-key --devices d2` readmits it" in err, err
    assert time.monotonic() - started < 2 and transport.published == []  # nothing sent, no timeout waited
    keys.register("d2", DEVICES["d2"].public)  # readmitted with a fresh key: asked again
    code, out, err = run_cli("bench", "--device", "d2", "--timeout", "1", "--fleet", fleet_file)
    assert code == 5 and "d2: no answer to 'bench'" in err and [m["device"] for m in transport.published] == ["d2"], err


def test_fleet_revoke_with_the_broker_down_revokes_the_key_and_says_in_one_line_its_retained_messages_are_left(
        tmp_path, run_cli):
    """`fleet revoke` left a revoked device's retained status, reported and desired messages on the broker, sent to
    (and refused by) every receiver that subscribes. It now clears them with the operator's credentials; a broker it
    cannot reach leaves the revocation standing and one line says what is left and what to do, exit 4 as for the
    other step at the broker that can fail (its passwd)."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.sim.broker import free_port

    fleet_file = tmp_path / "fleet.yaml"
    port = free_port()  # nothing listens there
    fleet_file.write_text(f"fleet: {FLEET}\nbroker: {{host: 127.0.0.1, port: {port}}}\n"
                          "defaults: {user: edgekit, profile: rpi4}\ndevices:\n  - {name: d1, host: 127.0.0.1}\n")
    keys = load_fleet(fleet_file).key_store()
    keys.register_many({"d1": DEVICES["d1"].public})
    code, out, err = run_cli("fleet", "revoke", "d1", "--fleet", fleet_file, "--reason", "lost")
    assert code == 4 and err.count("\n") == 1, (out, err)
    assert err.startswith("d1: its retained status, reported and desired messages are left on the broker (cannot "
                          f"reach the MQTT broker at 127.0.0.1:{port}"), err
    assert err.rstrip().endswith("run this command again once the broker is up to clear them"), err
    assert f"key {DEVICES['d1'].key_id} revoked" in out and keys.devices() == {}  # the revocation stands
    code, out, err = run_cli("fleet", "revoke", "d1", "--fleet", fleet_file, "--json")
    done = json.loads(out)
    assert code == 4 and done["retained_failed"] is True and not done["newly_revoked"] and "left on the broker" in done["retained"]


def test_a_measuring_round_does_not_ask_a_device_revoked_since_and_names_it_among_the_silent(tmp_path):
    """tune's round sends every device its benchmarks at once: a device revoked since the round's deploy would have
    ended the whole round on its refusal (FleetClient.send raises before sending). It is not asked, and named among
    the devices that did not answer with the revocation's line; the others are measured."""
    entry = {"device": "d2", "key_id": "k2", "revoked": 1_764_460_800.0, "reason": "stolen"}
    transport = FakeTransport(agent())
    c = FleetClient(BrokerConfig(), FLEET, transport=transport, signer=OPERATOR,
                    keyring=Keyring({k: v.public for k, v in DEVICES.items()}, [OPERATOR.public]),
                    revoked=lambda device: entry if device == "d2" else None)
    with c:
        stored, silent, _ = _measure(c, Store(tmp_path / "h.db"), {"d1": [("int8", "a" * 64)], "d2": [("int8", "b" * 64)]},
                                     {"min_runs": 10}, timeout=2)
    assert stored == 1 and [m["device"] for m in transport.published] == ["d1"]
    assert list(silent) == ["d2"] and silent["d2"][0].startswith("int8 (not asked: d2: its key k2 was revoked on "), silent


def test_an_empty_payload_is_a_clear_only_on_a_retained_topic_elsewhere_it_is_refused_and_counted():
    """An empty payload clears a retained message (`fleet revoke` clears status, reported and desired); the client
    dropped it uncounted on every topic, so empty messages on a device's bench or cmd/ack topic, where nothing is
    retained, went unseen. Now only the retained kinds' are clears."""
    from paho.mqtt.client import MQTTMessage

    with client(agent()) as c:
        before = c.rejected_count
        for kind in ("status", "reported", "bench", "cmd/ack"):
            message = MQTTMessage(mid=1, topic=messages.topic(FLEET, "d1", kind).encode())
            message.payload = b""
            c._on_message(None, None, message)
        assert c.rejected_count - before == 2
        assert [r.split(": ", 1)[0].rsplit("/", 1)[-1] for r in list(c.rejected)[-2:]] == ["bench", "ack"]


def test_what_a_revoked_device_left_is_counted_once_however_often_it_is_sent_again():
    """`fleet status` counted every copy of a revoked device's last will that a keyless peer sent again as one more
    leftover; each is counted once, by its msg_id."""

    class LeftKeyring(Keyring):
        def left_by_revoked(self, topic, payload, retained):
            return payload.decode()  # the will's msg_id, as the registry keyring says it

    c = FleetClient(BrokerConfig(), FLEET, transport=FakeTransport(agent()), signer=OPERATOR,
                    keyring=LeftKeyring({k: v.public for k, v in DEVICES.items()}, [OPERATOR.public]))
    with c:
        for payload in (b"will-1", b"will-1", b"will-1", b"will-2"):
            c.client.deliver(messages.topic(FLEET, "d1", "status"), payload)
        assert c.left_by_revoked == 2 and c.rejected_count == 0


def test_metrics_wait_served_says_in_one_line_when_metrics_does_not_answer_whole():
    """The monitor prints its /metrics URL only once a scrape gets every series (FleetMetrics.wait_served): one that
    answers nothing, or without a series, is one line naming the URL and what it lacked, never a URL printed."""
    from prometheus_client import Gauge

    from edge_kit.errors import InputError
    from edge_kit.sim.broker import free_port
    from edge_kit.telemetry.metrics import FleetMetrics

    metrics = FleetMetrics()
    server = metrics.serve(0)
    try:
        metrics.wait_served(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5)  # answers whole: returns
        other = FleetMetrics()
        Gauge("edgekit_late", "a series the server's registry lacks", registry=other.registry)
        with pytest.raises(InputError) as raised:  # the server answers for another registry, without edgekit_late
            other.wait_served(f"http://127.0.0.1:{server.server_port}/metrics", timeout=0.3)
        assert "no HELP/TYPE of edgekit_late" in str(raised.value) and "\n" not in str(raised.value)
    finally:
        server.shutdown()
    url = f"http://127.0.0.1:{free_port()}/metrics"
    with pytest.raises(InputError) as raised:
        metrics.wait_served(url, timeout=0.3)
    assert str(raised.value).startswith(f"{url}: /metrics did not answer with every series within 0.3 s (")


def test_monitor_prints_what_it_could_not_judge_as_notes_not_alerts(tmp_path, run_cli, monkeypatch):
    """An accuracy bound the monitor could not judge (no fp32 accuracy of the device's model) is said once, as a note
    (printed, and ``notes`` in the --json summary), never as an alert."""
    note = "d1 int8: accuracy >= 0.99 x fp32 not judged: no fp32 benchmark of model digits with an accuracy from d1"
    fleet_file = _offline_monitor(tmp_path, monkeypatch, notes=[note])
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "0", "--json")
    assert code == 0 and json.loads(out)["notes"] == [note] and json.loads(out)["alerts"] == [], err
    code, out, err = run_cli("monitor", "--fleet", fleet_file, "--duration", "0")
    assert code == 0 and f"note {note}" in " ".join(out.split()) and "alert" not in out.replace("alerts)", ""), out


def test_metrics_on_every_address_are_told_by_this_hosts_name_too():
    """`monitor --metrics-addr 0.0.0.0` printed http://0.0.0.0:PORT/metrics: no other host can scrape that URL. The
    line now gives the URL by this host's name as well; a loopback or named address is printed as it is."""
    import socket

    from edge_kit.telemetry.metrics import metrics_where

    name = socket.gethostname()
    assert metrics_where("0.0.0.0", 9108) == (f"http://0.0.0.0:9108/metrics (every address of this host: from another "
                                              f"host, http://{name}:9108/metrics)")
    assert metrics_where("::", 9108).startswith(f"http://[::]:9108/metrics (every address of this host: from another "
                                                f"host, http://{name}:9108/metrics)")
    assert metrics_where("127.0.0.1", 9108) == "http://127.0.0.1:9108/metrics"
    assert metrics_where("fe80::1", 9108) == "http://[fe80::1]:9108/metrics"
