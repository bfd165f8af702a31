"""What a device sends is shown, never obeyed: no terminal controls or rich markup from a device reach the
operator's terminal, no tag of it reaches the report's plots, one device's odd shapes crash no command, and
its label values cannot grow the monitor's metrics without bound."""

from __future__ import annotations

import json
import time

import pytest
from monitor_helpers import fleet_yaml
from prometheus_client import generate_latest

from edge_kit.telemetry.metrics import MAX_LABEL_VALUES, OVERFLOW, FleetMetrics
from edge_kit.telemetry.store import Store, history_path
from edgekit_protocol import messages
from edgekit_protocol.errors import MessageError

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x1b\\"  # writes the operator's clipboard
EVIL = "int8" + OSC52 + "[link=file:///etc/shadow]x[/link][/][bold red]ALERT\r\n\u202e"
TAG = '<a href="https://evil.example">int8</a><img src=x onerror=alert(1)>'


def _bench(variant, seq, sensor="ina219"):
    return messages.envelope("bench", "sim", "d1", seq, {
        "profile": "rpi4", "variant": variant, "sha256": "a" * 64, "runs": 100, "simulated": False, "runtime": TAG,
        "latency_ms": {q: 5.0 for q in ("p50", "p90", "p99", "mean", "std", "min", "max")},
        "power": {"sensor": sensor, "avg_w": 4.2, "energy_per_inference_mj": 0.5}, "accuracy": {"value": 0.99}})


@pytest.fixture
def fleet_file(tmp_path):
    return fleet_yaml(tmp_path / "fleet.yaml", ('d1',))


def _live(seq, **body):
    """A ``live`` message of d1 as a history may hold it (stored without the monitor's checks: any shape)."""
    return ("live", messages.envelope("live", "sim", "d1", seq, body))


def _history(fleet_file, *extra):
    store = Store(history_path(fleet_file))
    store.add_many([("bench", _bench(EVIL, 1, sensor="ina" + OSC52 + "[blink]")), ("bench", _bench(TAG, 2)),
                    ("status", messages.envelope("status", "sim", "d1", 3, {
                        "state": "online", "profile": "rpi4", "current": {"variant": EVIL, "sha256": "a" * 64}})),
                    *extra])
    store.close()


def test_fleet_status_shows_device_text_without_obeying_it(fleet_file, run_cli):
    _history(fleet_file)
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out  # no escape sequence, no overwritten line
    assert "int8\\x1b]52;c;ZWNobyBwd25lZA==\\x1b\\[link=file:///etc/shadow]x[/link][/][bold red]ALERT" in out
    assert "\\x0d\\x0a\\u202e" in out


def test_report_and_status_take_any_shape_a_device_sends(fleet_file, run_cli, tmp_path):
    odd_live = _live(4, latency_ms={"p50": "fast", "p99": 1.0}, requests="many", model="int8")
    with pytest.raises(MessageError):  # the monitor refuses it; a history written otherwise may hold it
        messages.check_body("live", odd_live[1])
    _history(fleet_file, odd_live)
    report = tmp_path / "report.html"
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", report, "--json")
    assert code == 0, err
    page = report.read_text()
    assert "<img src=x" not in page and "\\u003cimg" not in page and "\\u003ca href" not in page  # plotly gets entities
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<td>?/1 (?, None)</td>" in page


def test_a_status_whose_current_is_not_an_object_is_refused():
    good = {"state": "online", "current": {"variant": "int8", "sha256": "a" * 64}}
    messages.check_body("status", messages.envelope("status", "sim", "d1", 1, good))
    messages.check_body("status", messages.envelope("status", "sim", "d1", 1, {"state": "online", "current": None}))
    for current in ("int8", ["int8"], {"variant": 8, "sha256": "a"}, {"variant": "int8", "sha256": {"x": 1}}):
        with pytest.raises(MessageError, match="current"):
            messages.check_body("status", messages.envelope("status", "sim", "d1", 1, {"state": "online", "current": current}))


def test_error_lines_show_control_characters_escaped():
    from edge_kit.cli.app import printable, safe

    assert printable("refused: \x1b]52;c;eA==\x07\nforged\x9b") == "refused: \\x1b]52;c;eA==\\x07\\x0aforged\\x9b"
    assert safe("[/]x") == "\\[/]x"


def test_a_name_with_invisible_characters_cannot_pass_for_another_devices():
    """Zero-width spaces and joiners, the soft hyphen, the Arabic letter mark and the byte order mark show
    nothing: 'rpi4-1' with one inside looked exactly like the real rpi4-1 in a table or an alert."""
    from edge_kit.cli.app import printable

    for invisible in ("\u200b", "\u200d", "\xad", "\u061c", "\u2060", "\ufeff", "\u180e"):
        shown = printable(f"rpi4{invisible}-1")
        assert shown != "rpi4-1" and invisible not in shown and shown.startswith("rpi4\\"), shown


def test_metrics_keep_a_bounded_number_of_label_values_per_device_and_count_the_rest():
    metrics = FleetMetrics()
    for i in range(10 * MAX_LABEL_VALUES):
        metrics.observe("bench", {**_bench(f"v{i}", i, sensor=f"s{i}"), "device": "d1"})
    text = generate_latest(metrics.registry).decode()
    variants = {ln.split('variant="')[1].split('"')[0] for ln in text.splitlines()
                if ln.startswith("edgekit_latency_ms{")}
    assert len(variants) == MAX_LABEL_VALUES + 1 and OVERFLOW in variants and "v0" in variants
    overflow = {json.dumps(s.labels, sort_keys=True): s.value for fam in metrics.registry.collect()
                if fam.name == "edgekit_metrics_label_overflow" for s in fam.samples if s.name.endswith("_total")}
    assert overflow == {json.dumps({"device": "d1", "label": "variant"}, sort_keys=True): 9 * MAX_LABEL_VALUES,
                        json.dumps({"device": "d1", "label": "source"}, sort_keys=True): 9 * MAX_LABEL_VALUES}
    metrics.observe("bench", {**_bench("v1", 999), "device": "d1"})  # a value already kept is still updated
    assert 'edgekit_latency_ms{device="d1",quantile="p90",variant="v1"} 5.0' in generate_latest(metrics.registry).decode()


HUGE = 10 ** 400  # valid JSON; float() of it overflows
LIVE = {"model": {"variant": "int8", "sha256": "a" * 64}, "requests": 5, "errors": 0, "window": 5}
SHADOW = {"model": {"variant": "fp32", "sha256": "b" * 64}, "serving": {"variant": "int8", "sha256": "a" * 64},
          "compared": 3, "window": 3, "fidelity": {"snr_db": 41.0, "cosine": 0.99, "max_abs_error": 0.1}}


@pytest.mark.parametrize("kind, odd", [
    ("live", {"errors": "many"}), ("live", {"queue_depth": [1]}), ("live", {"latency_ms": ["p50"]}),
    ("live", {"errors": True}), ("live", {"latency_ms": {"p50": "1", "p99": 2.5}}), ("live", {"model": "int8"}),
    ("live", {"model": {"variant": 7}}), ("live", {"errors": None}), ("live", {"requests": -5}),
    ("live", {"queue_depth": -1}), ("live", {"latency_ms": {"p50": -1.0}}), ("live", {"errors": HUGE}),
    ("live", {"latency_ms": {"p99": HUGE}}), ("shadow", {"fidelity": [40]}), ("shadow", {"model": "fp32"}),
    ("shadow", {"serving": {"variant": 7}}), ("shadow", {"fidelity": {"snr_db": -HUGE}}), ("shadow", {"window": [1]}),
    ("shadow", {"fidelity": {"max_abs_error": -0.1}}), ("shadow", {"share": 2.0}), ("shadow", {"compared": 1.5}),
    ("shadow", {"run": 7}), ("shadow", {"run": ""}), ("shadow", {"run": "r" * 65})])
def test_live_and_shadow_figures_of_any_other_shape_are_refused_at_the_monitors_check(kind, odd):
    """Live figures and shadow comparisons as a broken or hostile agent may send them: strings, lists, booleans,
    negatives or numbers no float can hold where figures go. They travelled unchecked inside telemetry; on their
    own topics the protocol refuses them (the monitor counts and keeps the refusal), so metrics, the drift alert
    and the report only ever see figures."""
    good = messages.envelope(kind, "sim", "d1", 1, LIVE if kind == "live" else SHADOW)
    assert messages.check_body(kind, good) == good
    with pytest.raises(MessageError, match=f"{kind}: (field ')?{next(iter(odd))}"):  # names what is wrong
        messages.check_body(kind, {**good, **odd})


def test_a_profile_a_record_names_is_a_bundled_name_never_a_path_on_this_host(fleet_file, run_cli, tmp_path):
    from edge_kit.profiles import profiles_dir

    elsewhere = tmp_path / "elsewhere.yaml"  # any file of this host (a FIFO would hang the report, /dev/zero fill it)
    elsewhere.write_text((profiles_dir() / "rpi4.yaml").read_text().replace("name: rpi4", "name: elsewhere"))
    store = Store(history_path(fleet_file))
    store.add_many([("bench", {**_bench("int8", 1), "profile": str(elsewhere)}),
                    ("bench", {**_bench("fp32", 2), "sha256": "b" * 64})])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["plots"] == 2  # rpi4's two figures; the path was not opened
    assert "elsewhere" not in (tmp_path / "r.html").read_text().split("<h2>Fleet</h2>")[0]


def test_metrics_take_a_benchmark_whose_metric_failed_or_whose_power_is_partial():
    """The agent's own shape for a metric that failed (no ``value``), and a power block with watts but no
    energy: exported as far as they are numbers, nothing raises."""
    metrics = FleetMetrics()
    bench = _bench("int8", 1)
    metrics.observe("bench", {**bench, "accuracy": {"error": "metric raised", "samples": 10},
                              "power": {"sensor": "ina219", "avg_w": 4.2}})
    text = generate_latest(metrics.registry).decode()
    assert 'edgekit_power_watts{device="d1",source="ina219",variant="int8"} 4.2' in text
    assert "edgekit_accuracy{" not in text and "edgekit_energy_per_inference_mj{" not in text


def test_last_heard_is_this_hosts_clock_not_the_devices():
    """A Raspberry Pi has no RTC: before NTP its clock says 1970, and a clock up to 300 s ahead is accepted.
    Last heard is when this monitor stored the message, so an alert on its age means silence, not skew."""
    import time

    metrics = FleetMetrics()
    before = time.time()
    metrics.observe("status", messages.envelope("status", "sim", "d1", 1, {"state": "online"}) | {"ts": 1.0})
    value = next(s.value for fam in metrics.registry.collect() if fam.name == "edgekit_device_last_seen_seconds"
                 for s in fam.samples)
    assert before <= value <= time.time()


def test_figures_no_float_can_hold_or_negative_bytes_are_left_out_of_metrics_never_raised():
    """Telemetry's disk figures are not checked at decode: an integer of 400 digits raised OverflowError in
    observe (the gauges of that message were never set), a negative free space was exported as is. (Live
    figures no float can hold are refused at decode: see the test above.)"""
    metrics = FleetMetrics()
    metrics.observe("telemetry", {"device": "d1", "ts": 1.0, "disk": {"free_bytes": HUGE}})
    metrics.observe("status", {"device": "d2", "ts": 1.0, "state": "online", "disk": {"free_bytes": -5}})
    text = generate_latest(metrics.registry).decode()
    assert "edgekit_device_disk_free_bytes{" not in text
    assert 'edgekit_device_online{device="d2"} 1.0' in text


def test_the_monitors_alerts_take_figures_no_float_can_hold(fleet_file, tmp_path):
    """The disk and drift alerts divided or formatted the device's figure: an integer of 400 digits raised
    OverflowError (and the message's metrics were skipped). A figure that is no figure raises no alert;
    a full disk still does."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    fleet_file.write_text(fleet_file.read_text().replace("{name: d1, host: 127.0.0.1}",
                                                         "{name: d1, host: 127.0.0.1, constraints: {min_fidelity_snr_db: 20}}"))
    mon = Monitor(load_fleet(fleet_file), Store(tmp_path / "h.db"), verify_in_child=False)
    for free in (HUGE, -HUGE, -5):
        mon._check_alerts("telemetry", {"device": "d1", "disk": {"free_bytes": free}})
    mon._check_alerts("shadow", {**SHADOW, "device": "d1", "fidelity": {"snr_db": -HUGE}})
    assert list(mon.alerts) == []
    mon._check_alerts("status", {"device": "d1", "state": "online", "disk": {"free_bytes": HUGE, "full": True}})
    assert [a.text for a in mon.alerts] == ["d1: disk full (installs, activations and benches refused)"]


def test_the_report_shows_a_live_figure_no_float_can_hold_as_unknown(fleet_file, run_cli, tmp_path):
    _history(fleet_file, _live(4, latency_ms={"p50": HUGE, "p99": 1.0}, requests=HUGE, model={"variant": "int8"}))
    report = tmp_path / "report.html"
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", report, "--json")
    assert code == 0, err
    assert "<td>?/1 (?, int8)</td>" in report.read_text()


def test_a_refusal_quoting_a_devices_huge_field_is_kept_short_in_memory_and_in_the_history(fleet_file, tmp_path):
    """A refusal's reason may quote what the device sent (its schema, state, fleet or device field: up to the
    64 KiB payload): 10,000 alerts in memory and 100,000 invalid rows of that were gigabytes. Now a reason is
    cut to MAX_REASON characters and says how long it was; the payload is kept as before."""
    import time

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import MAX_REASON, Monitor

    store = Store(tmp_path / "h.db")
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)
    payload = messages.encode({**_bench("int8", 1), "key_id": "k", "sig": "s", "schema": "x" * 60_000})
    mon._store([(messages.topic("sim", "d1", "bench"), payload, time.time(), None)])
    assert mon.stats.invalid == 1 == store.count("invalid")
    (reason,) = store._rows("SELECT reason FROM invalid")[0]
    assert len(reason) <= MAX_REASON + 40 and reason.startswith("schema 'xxx") and reason.endswith("characters)")
    assert len(mon.alerts[-1].text) <= MAX_REASON + 100 and "60,0" in mon.alerts[-1].text


def test_a_refused_payload_says_whether_it_was_not_utf8_or_not_json(fleet_file, tmp_path):
    """A payload of valid UTF-8 that is no JSON was refused and counted as "not UTF-8 JSON (JSONDecodeError)": the
    operator looked for a bad byte that was not there. Each reason now says which, and where."""
    import time

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    store = Store(tmp_path / "h.db")
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)
    topic = messages.topic("sim", "d1", "bench")
    mon._store([(topic, payload, time.time(), None) for payload in (b"ping", b'{"a": "\xff"}', b"{} {}")])
    assert mon.stats.invalid == 3 == store.count("invalid")
    assert [r["reason"] for r in reversed(store.refused_messages())] == [
        "payload is not JSON (Expecting value at line 1, column 1)",
        "payload is not UTF-8 (byte 7: invalid start byte)",
        "payload is not JSON (Extra data at line 1, column 4)"]


def test_fleet_status_last_heard_is_when_this_host_received_it_not_the_devices_clock(fleet_file, run_cli):
    """A Raspberry Pi has no RTC: before NTP its clock says 1970 (and a clock up to 300 s ahead is accepted).
    `fleet status` said "1764... s ago" (or "-290 s ago") from the device's ts; now the receive time."""
    import time

    store = Store(history_path(fleet_file))
    now = time.time()
    store.add_many([("status", messages.envelope("status", "sim", "d1", 1, {"state": "online"}) | {"ts": 1.0}),
                    ("telemetry", messages.envelope("telemetry", "sim", "d1", 2, {"conditions": {}, "spool": {}})
                     | {"ts": now + 290})], received=[now - 30, now - 20])
    assert store.last_received() == {"d1": now - 20}
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    row = next((line for line in out.splitlines() if line.split()[:1] == ["d1"]), out)
    assert row.rstrip().endswith(("20 s ago", "21 s ago")), row


def test_label_values_reach_metrics_without_terminal_controls():
    """prometheus-client escapes quotes, backslashes and newlines only: a variant's ESC (clear the screen,
    OSC 52 clipboard), CR (overwrite a line) and bidi overrides reached whoever reads /metrics with curl."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = FleetMetrics()
    metrics.observe("bench", {**_bench("int8\x1b[2J\r\u202e", 1, sensor="ina" + OSC52), "device": "d1"})
    text = generate_latest(metrics.registry).decode()
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    labels = [s.labels for fam in text_string_to_metric_families(text) if fam.name == "edgekit_power_watts" for s in fam.samples]
    assert labels == [{"device": "d1", "variant": "int8\\x1b[2J\\x0d\\u202e", "source": "ina\\x1b]52;c;ZWNobyBwd25lZA==\\x1b\\"}]


@pytest.mark.parametrize("profile", [["rpi4"], {"name": "rpi4"}, 4])
def test_a_benchmark_whose_profile_is_not_text_is_reported_under_unknown(fleet_file, run_cli, tmp_path, profile):
    """A bench record's ``profile`` is the device's word, any JSON: a list or an object raised TypeError
    (unhashable) in `edgekit report`, a traceback and no report. Now it is grouped as no known profile (from the
    history alone; with the fleet file, which names d1's profile, its records are placed there)."""
    store = Store(history_path(fleet_file))
    store.add_many([("bench", {**_bench("int8", 1), "profile": profile}), ("bench", {**_bench("fp32", 2), "sha256": "b" * 64})])
    store.close()
    code, out, err = run_cli("report", "--history", history_path(fleet_file), "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["profiles"] == ["rpi4", "unknown"] and info["plots"] == 2
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["profiles"] == ["rpi4"]


def test_a_flood_of_refused_messages_cannot_scroll_a_devices_alert_off_the_screen():
    """The live table printed every new alert each second: a device publishing junk put thousands of
    'refused' lines a second on the terminal, burying an offline alert among them. Now at most
    MAX_REFUSED_SHOWN refused ones, the rest summed in one line; every alert about a device is printed."""
    from edge_kit.cli.loop import MAX_REFUSED_SHOWN, alert_lines
    from edge_kit.telemetry.monitor import Alert

    alerts = [Alert("edgekit/v1/sim/d1/bench", "refused", f"refused a message: junk {i}") for i in range(1000)]
    alerts.insert(500, Alert("d2", "offline", "d2 went offline [/]"))
    lines = alert_lines(alerts, len(alerts) + 7)
    assert lines[0] == "[red]alert[/] 7 older alerts not shown (too many)"
    assert "[red]alert[/] d2 went offline \\[/]" in lines
    assert len([ln for ln in lines if "junk" in ln]) == MAX_REFUSED_SHOWN
    assert lines[-1].startswith(f"[red]alert[/] {1000 - MAX_REFUSED_SHOWN:,} more refused messages")
    assert len(lines) == MAX_REFUSED_SHOWN + 3
    assert alert_lines(alerts, 0) == [] and alert_lines(alerts[:2], 1) == ["[red]alert[/] refused a message: junk 1"]


def test_an_alert_or_a_status_cell_quoting_a_devices_huge_variant_is_kept_short(fleet_file, tmp_path, run_cli):
    """A compromised device may name its variant with 60,000 characters: each broken-constraint alert held it
    whole (10,000 alerts kept: 600 MB) and `fleet status` folded it into a cell thousands of lines tall."""
    import time

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import MAX_ALERT_CHARS, Monitor

    huge = "v" * 60_000
    mon = Monitor(load_fleet(fleet_file), Store(tmp_path / "h.db"), verify_in_child=False)
    slow = {**_bench(huge, 1), "latency_ms": {q: 500.0 for q in ("p50", "p90", "p99", "mean", "std", "min", "max")}}
    mon._check_alerts("bench", slow)  # rpi4 allows p90 <= 50 ms
    (alert,) = mon.alerts
    assert alert.kind == "constraints" and len(alert.text) <= MAX_ALERT_CHARS + 40
    assert alert.text.startswith("d1 vvvv") and alert.text.endswith(" characters)")
    store = Store(history_path(fleet_file))
    store.add_many([("status", messages.envelope("status", "sim", "d1", 1, {
        "state": "online", "current": {"variant": huge, "sha256": "a" * 64}}))], received=[time.time()])
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    assert "vvvv" in out and out.count("v") < 300 and len(out.splitlines()) < 20  # 128 of them, and a few of the note's
    assert "characters)" in out  # and says how long it was


def test_a_drifting_devices_shadow_comparison_raises_the_alert_and_updates_the_metrics(fleet_file, tmp_path):
    """The drift alert read live.model.variant and shadow.model.variant as objects: a device sending them as
    text raised AttributeError after storing (a traceback on the operator's terminal) and skipped the alert
    and the message's metrics. The comparison comes on its own ``shadow`` topic now, its models objects with
    text or null names (checked at decode); unnamed ones are said so."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    fleet_file.write_text(fleet_file.read_text().replace("{name: d1, host: 127.0.0.1}",
                                                         "{name: d1, host: 127.0.0.1, constraints: {min_fidelity_snr_db: 20}}"))
    metrics = FleetMetrics()
    mon = Monitor(load_fleet(fleet_file), Store(tmp_path / "h.db"), verify_in_child=False, on_message=metrics.observe)
    msg = messages.envelope("shadow", "sim", "d1", 1, {**SHADOW, "model": {"variant": None, "sha256": None},
                                                       "serving": {}, "fidelity": {"snr_db": 5.0}})
    mon._after_store("shadow", messages.check_body("shadow", msg))
    assert [a.text for a in mon.alerts] == ["d1: live outputs of an unnamed model are 5.0 dB from an unnamed model "
                                            "(shadow, 3 inputs), below 20 dB"]
    text = generate_latest(metrics.registry).decode()
    assert 'edgekit_device_last_seen_seconds{device="d1"}' in text
    assert 'edgekit_live_shadow_snr_db{device="d1",shadow="None",variant="None"} 5.0' in text


def test_a_shadow_run_far_off_or_answering_nan_raises_the_drift_alert(fleet_file, tmp_path):
    """A served variant whose outputs are huge or diverged measures an error above 1e12: the message was refused
    at the body check, so the drift alert never fired for the device it exists for. A shadow run that met NaN
    or infinity in an answer (counted as ``non_finite``) is drift too, whatever the finite pairs say."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    fleet_file.write_text(fleet_file.read_text().replace(
        "{name: d1, host: 127.0.0.1}", "{name: d1, host: 127.0.0.1, constraints: {min_fidelity_snr_db: 20}}\n"
        "  - {name: d2, host: 127.0.0.2, constraints: {min_fidelity_snr_db: 20}}"))
    mon = Monitor(load_fleet(fleet_file), Store(tmp_path / "h.db"), verify_in_child=False)
    far = {"snr_db": -12.0, "cosine": 0.2, "max_abs_error": 3.1e37, "mean_abs_error": 4e21}
    for device, seq, body in (("d1", 1, {"fidelity": far}), ("d2", 1, {"non_finite": 3, "fidelity": None}),
                              ("d2", 2, {"non_finite": 3, "fidelity": {"snr_db": 40.0}})):
        msg = messages.envelope("shadow", "sim", device, seq, {**SHADOW, **body, "key_id": "k", "sig": "s"})
        mon._after_store("shadow", messages.check_body("shadow", messages.decode(messages.encode(msg), "shadow")))
    assert [a.text for a in mon.alerts if a.kind == "drift"] == [
        "d1: live outputs of int8 are -12.0 dB from fp32 (shadow, 3 inputs), below 20 dB",
        "d2: 3 live answers of int8 or of its shadow fp32 held NaN or infinity (shadow run's non_finite count)"]


def test_live_counts_a_device_did_not_send_are_left_out_of_metrics_never_exported_as_zero():
    """An agent whose live figures lack a queue depth did not measure it: a dashboard showing 0 would say no
    request ever waited. What it sent is exported as it sent it; a live message without an error count is
    refused (it is required: 0 errors must be said, never assumed)."""
    metrics = FleetMetrics()
    metrics.observe("live", {**LIVE, "device": "d1", "ts": 1.0})
    metrics.observe("live", {**LIVE, "device": "d2", "ts": 1.0, "errors": 2, "queue_depth": 0})
    text = generate_latest(metrics.registry).decode()
    assert 'edgekit_live_requests{device="d1",variant="int8"} 5.0' in text
    assert not [ln for ln in text.splitlines() if ln.startswith("edgekit_live_queue_depth{") and 'device="d1"' in ln]
    assert 'edgekit_live_errors{device="d2",variant="int8"} 2.0' in text and 'edgekit_live_queue_depth{device="d2"} 0.0' in text
    with pytest.raises(MessageError, match="live: field 'errors' is missing"):
        messages.check_body("live", messages.envelope("live", "sim", "d1", 1, {k: v for k, v in LIVE.items() if k != "errors"}))


def test_the_report_shows_a_live_figure_the_device_did_not_send_as_unknown_not_zero(fleet_file, run_cli, tmp_path):
    _history(fleet_file, _live(4, latency_ms={"p99": 1.0}, model={"variant": "int8"}))
    report = tmp_path / "report.html"
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", report, "--json")
    assert code == 0, err
    assert "<td>?/1 (?, int8)</td>" in report.read_text()


def test_a_shadow_snr_below_zero_is_a_figure_kept_in_metrics():
    """A negative request count, error count, queue depth or service time is no figure (refused at decode: see
    above); a shadow SNR may be below 0 dB and is kept, as is a live p99 the device sent without a p50."""
    metrics = FleetMetrics()
    shadow = {**SHADOW, "fidelity": {"snr_db": -4.0}}
    assert messages.check_body("shadow", messages.envelope("shadow", "sim", "d1", 1, shadow))
    metrics.observe("shadow", {**shadow, "device": "d1", "ts": 1.0})
    metrics.observe("live", {**LIVE, "device": "d1", "ts": 1.0, "latency_ms": {"p99": 2.0}})
    text = generate_latest(metrics.registry).decode()
    assert 'quantile="p50"' not in text and 'edgekit_live_latency_ms{device="d1",quantile="p99",variant="int8"} 2.0' in text
    assert 'edgekit_live_shadow_snr_db{device="d1",shadow="fp32",variant="int8"} -4.0' in text


@pytest.mark.parametrize("odd", [{}, {"runtime": "litert", "runtime_version": [1], "conditions": "hot"},
                                 {"accuracy": {"value": 0.9}}, {"fidelity": {"snr_db": 30.0}}])
def test_edgekit_bench_prints_a_record_of_a_shape_it_does_not_know_without_a_traceback(odd):
    """`edgekit bench --device` formatted the record with the agent's own summary, which reads every optional
    field it writes: a record that passed the wire checks but lacked one (an older or a compromised agent)
    raised KeyError or TypeError, a traceback. Now its figures are listed as they are, said so."""
    from edge_kit.cli.fleet import bench_rows

    record = {**_bench("int8", 1), **odd}
    rows = dict(bench_rows(record))
    assert rows["variant"].startswith("int8")
    assert rows["note"] == "the record lacks fields this host's summary reads: shown as received (--json for all of it)"
    assert rows["latency_ms"] == "p50 5.0, p90 5.0, p99 5.0, mean 5.0, std 5.0, min 5.0, max 5.0"


def test_a_flood_at_qos_0_is_dropped_and_counted_past_a_bound_never_queued_without_end(fleet_file, tmp_path, monkeypatch):
    """QoS 1 messages are bounded by the broker's inflight limit (the monitor acknowledges once stored); QoS 0
    ones were queued without end while the checker fell behind: a device flooding at QoS 0 grew the monitor's
    memory. Past MAX_QUEUED they are dropped, counted, alerted once and exported; QoS 1 ones are still queued."""
    from types import SimpleNamespace

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "MAX_QUEUED", 100)
    mon = monitor_module.Monitor(load_fleet(fleet_file), Store(tmp_path / "h.db"), verify_in_child=False)
    metrics = FleetMetrics()
    metrics.watch(mon)
    topic = messages.topic("sim", "d1", "telemetry")
    for i in range(1000):
        mon._on_message(None, None, SimpleNamespace(topic=topic, payload=b"{}", qos=0, mid=i))
    mon._on_message(None, None, SimpleNamespace(topic=topic, payload=b"{}", qos=1, mid=5000))
    assert mon._queue.qsize() == 101 and mon.stats.dropped == 900
    assert [a.kind for a in mon.alerts] == ["refused"] and "QoS 0 messages arrive faster" in mon.alerts[0].text
    assert 'edgekit_monitor_messages_total{outcome="dropped"} 900.0' in generate_latest(metrics.registry).decode()


def test_a_lone_surrogate_a_history_row_holds_is_shown_escaped_by_fleet_status_and_the_report(fleet_file, run_cli,
                                                                                                tmp_path):
    """Decode refuses lone surrogates and none can be signed, but a history row holding one by another way (here
    stored directly, its JSON escape intact) raised UnicodeEncodeError when `fleet status` printed it and when
    `edgekit report` wrote its page: a traceback. Defence in depth: shown as \\udXXX."""
    status = messages.envelope("status", "sim", "d1", 1, {"state": "online", "current": {"variant": "x", "sha256": "a" * 64}})
    raw = messages.encode(status).replace(b'"variant":"x"', b'"variant":"int8\\ud800"')
    store = Store(history_path(fleet_file))
    store.add_many([("status", status)], raw=[raw])
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    assert "int8\\ud800" in out
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert "int8\\ud800" in (tmp_path / "r.html").read_text()


def test_a_power_sensor_name_of_60_kb_is_shown_cut_in_status_and_report(fleet_file, run_cli, tmp_path):
    """The sensor's key is the device's word: a 60 KB name filled `fleet status`'s W (source) cell with
    thousands of lines, and the report's legend and fleet table with all of it."""
    from edgekit_protocol.labels import power_source

    huge = "s" * 60_000
    assert power_source({"sensor": huge}) == "s" * 64 + "... (60,000 characters)"
    store = Store(history_path(fleet_file))
    store.add_many([("bench", _bench("int8", 1, sensor=huge)), ("status", messages.envelope("status", "sim", "d1", 2, {
        "state": "online", "current": {"variant": "int8", "sha256": "a" * 64}}))])
    store.close()
    code, out, err = run_cli("fleet", "status", "--fleet", fleet_file)
    assert code == 0, err
    assert out.count("s" * 10) < 10 and len(out.splitlines()) < 20
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert "s" * 65 not in (tmp_path / "r.html").read_text()


def test_the_report_cuts_a_devices_60_kb_variant_runtime_or_profile_name(fleet_file, run_cli, tmp_path):
    """Plot legends, hover texts and the fleet table held a device's names whole: 60 KB each, several times."""
    huge = "v" * 60_000
    store = Store(history_path(fleet_file))
    store.add_many([("bench", {**_bench(huge, 1), "runtime": "r" * 60_000}),
                    ("status", messages.envelope("status", "sim", "d1", 2, {
                        "state": "online", "profile": "p" * 60_000, "current": {"variant": huge, "sha256": "a" * 64}})),
                    _live(3, latency_ms={"p50": 1.0, "p99": 2.0}, requests=5, model={"variant": "w" * 60_000})])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert all(c * 129 not in page for c in "vrpw")
    assert "v" * 128 + "... (60,000 characters)" in page


def test_the_accuracy_series_names_its_metric_a_detection_map_is_not_called_top1():
    """The gauge was edgekit_accuracy_top1 "(0-1)" whatever the task: a detector's mAP or a user metric of 37.5
    read as top-1 on a dashboard. Now edgekit_accuracy carries the metric the record names (bounded per device)."""
    metrics = FleetMetrics()
    metrics.observe("bench", {**_bench("int8", 1), "accuracy": {"metric": "mAP50", "value": 0.41}})
    metrics.observe("bench", {**_bench("fp32", 2), "accuracy": {"metric": "wer_pct", "value": 37.5}})
    metrics.observe("bench", {**_bench("fp16", 3), "accuracy": {"value": 0.9}})
    text = generate_latest(metrics.registry).decode()
    assert 'edgekit_accuracy{device="d1",metric="mAP50",variant="int8"} 0.41' in text
    assert 'edgekit_accuracy{device="d1",metric="wer_pct",variant="fp32"} 37.5' in text
    assert 'edgekit_accuracy{device="d1",metric="unnamed",variant="fp16"} 0.9' in text


def test_metrics_say_which_devices_figures_a_simulating_machine_measured():
    """A simulated device's latency and power series read exactly as a real Pi's: a dashboard could not tell
    this host's timings from the hardware's. edgekit_device_simulated says which device is which."""
    metrics = FleetMetrics()
    metrics.observe("bench", {**_bench("int8", 1), "simulated": True})
    metrics.observe("bench", {**_bench("int8", 1), "device": "d2"})  # _bench: simulated False
    metrics.observe("status", {"device": "d3", "ts": 1.0, "state": "online", "simulated": True})
    metrics.observe("status", {"device": "d4", "ts": 1.0, "state": "online"})  # an agent that does not say
    lines = [ln for ln in generate_latest(metrics.registry).decode().splitlines()
             if ln.startswith("edgekit_device_simulated{")]
    assert sorted(lines) == ['edgekit_device_simulated{device="d1"} 1.0', 'edgekit_device_simulated{device="d2"} 0.0',
                             'edgekit_device_simulated{device="d3"} 1.0']
    # its help named the benchmark series alone: a simulated device's serving figures read as its hardware's
    helps = {ln.split()[2]: ln for ln in generate_latest(metrics.registry).decode().splitlines()
             if ln.startswith("# HELP edgekit_")}
    assert "accuracy and live (serving and shadow) series are measurements of the machine" in helps[
        "edgekit_device_simulated"]
    for name in ("edgekit_live_requests", "edgekit_live_latency_ms", "edgekit_live_shadow_snr_db"):
        assert "a simulated device's (edgekit_device_simulated 1) by the machine simulating it" in helps[name]


def test_a_constraint_alert_names_the_figure_that_broke_it_and_where_it_came_from(fleet_file, tmp_path):
    """The alert said "breaks power <= 6.5 W" alone: an estimate from CPU use read as a measured watt, and a
    simulated device's figure as its hardware's."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    mon = Monitor(load_fleet(fleet_file), Store(tmp_path / "h.db"), verify_in_child=False)
    hot = {**_bench("int8", 1), "simulated": True,  # rpi4: p90 <= 50 ms, power <= 6.5 W
           "latency_ms": {q: 80.0 for q in ("p50", "p90", "p99", "mean", "std", "min", "max")},
           "power": {"estimated": True, "sensor": None, "avg_w": 6.9, "energy_per_inference_mj": 550.0}}
    mon._check_alerts("bench", hot)
    (alert,) = mon.alerts
    assert alert.text == ("d1 int8: breaks p90 <= 50 ms (80 ms p90, the device's clock), power <= 6.5 W "
                          "(6.9 W, estimated); a simulated device: this machine's figures")


def test_the_reports_live_cell_says_when_its_p99_rests_on_too_few_requests(fleet_file, run_cli, tmp_path):
    """A p99 over the 12 requests an agent had served was shown as one; it is their slowest, interpolated."""
    def live(seq, window):
        return _live(seq, latency_ms={"p50": 0.8, "p99": 1.25}, requests=40, window=window, model={"variant": "int8"})

    for seq, window, cell in ((4, 12, "<td>0.8/1.25 (40, int8; only 12 request(s) in the window: p99 lie between the "
                                      "slowest samples, not true percentiles (100+ give one))</td>"),
                              (5, 2048, "<td>0.8/1.25 (40, int8)</td>")):
        _history(fleet_file, live(seq, window))
        report = tmp_path / "report.html"
        code, out, err = run_cli("report", "--fleet", fleet_file, "--out", report, "--json")
        assert code == 0, err
        assert cell in report.read_text()


def test_the_latency_series_help_names_the_call_each_runtime_times():
    """The help said "perf_counter_ns around invoke" for every series: an ONNX Runtime or TensorRT latency (session.run,
    host copies included) read as an interpreter's invoke()."""
    metrics = FleetMetrics()
    metrics.observe("bench", _bench("int8", 1))
    (help_line,) = [ln for ln in generate_latest(metrics.registry).decode().splitlines()
                    if ln.startswith("# HELP edgekit_latency_ms ")]
    assert "invoke() on LiteRT" in help_line and "session.run() on ONNX Runtime and TensorRT" in help_line


def test_a_status_an_earlier_monitor_run_stored_is_not_alerted_again(fleet_file, tmp_path):
    """The broker sends each device's retained status again on every subscribe: each new run of `edgekit monitor`
    counted it a duplicate, yet alerted "d1 went offline" again for a device that went offline runs ago."""
    import json
    import time

    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor
    from edgekit_protocol import messages

    offline = messages.envelope("status", "sim", "d1", 1, {"state": "offline"})
    store = Store(tmp_path / "h.db")
    first = Monitor(load_fleet(fleet_file), store, verify_in_child=False)
    first._keep([("status", offline)], [json.dumps(offline).encode()], [time.time()])
    assert [a.text for a in first.alerts] == ["d1 went offline"] and first.stats.stored == 1
    later = Monitor(load_fleet(fleet_file), store, verify_in_child=False)  # the next run, the same retained status
    later._keep([("status", offline)], [json.dumps(offline).encode()], [time.time()])
    assert list(later.alerts) == [] and later.stats.duplicates == 1 and later.stats.stored == 0
    # a new word from the device while its offline episode holds (the alerts table keeps it open): not news
    again = messages.envelope("status", "sim", "d1", 2, {"state": "offline"})
    later._keep([("status", again)], [json.dumps(again).encode()], [time.time()])
    assert list(later.alerts) == []
    for seq, state in ((3, "online"), (4, "offline")):  # back online (the episode ends), then offline: news
        word = messages.envelope("status", "sim", "d1", seq, {"state": state})
        later._keep([("status", word)], [json.dumps(word).encode()], [time.time()])
    assert [a.text for a in later.alerts] == ["d1 went offline"]


def test_a_status_received_late_neither_revives_a_device_nor_ends_its_offline_episode(fleet_file, tmp_path):
    """The monitor opened and closed a device's offline episode by each status as it came: an older connection's status
    received after the will (one a --share peer stamped late, or handed over late) closed the episode of a device
    whose last will said offline. Now it goes by the device's newest status in its own order, as stored: only a newer
    connection's status ends the episode."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    store = Store(tmp_path / "h.db")
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)

    def keep(seq, state, connection):  # connection c1: will 10, statuses 11 and 12; c2: will 13, status 14
        word = messages.envelope("status", "sim", "d1", seq, {"state": state, "connection": connection}, epoch="e1")
        mon._keep([("status", word)], [messages.encode(word)], [time.time()])
        return [r["cleared_at"] is None for r in store.alerts() if r["kind"] == "offline"]

    assert keep(10, "offline", "c1") == [True]  # c1's will: offline
    assert keep(11, "online", "c1") == [True]  # c1's status, stored after its will: still offline
    assert keep(14, "online", "c2") == [False]  # c2 connected: the episode ends
    assert keep(13, "offline", "c2") == [True, False]  # c2's will: a new episode
    assert keep(12, "online", "c1") == [True, False]  # an older connection's status, late: no news
    assert [a.text for a in mon.alerts] == ["d1 went offline", "d1 went offline"]


def test_a_re_imaged_devices_first_status_ends_its_offline_episode(fleet_file, tmp_path):
    """The monitor read a batch's statuses by the device's order before it recorded the new epoch the batch's messages
    carried: a re-imaged device's first status (its new numbering's online, seq 2) was judged older than its old
    numbering's will, and its offline episode held until its next status (a switch, a reconnect: days). Now a new
    epoch taken in the batch has the device's status read again."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    store = Store(tmp_path / "h.db")
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)

    def keep(seq, state, connection, epoch):
        word = messages.envelope("status", "sim", "d1", seq, {"state": state, "connection": connection}, epoch=epoch)
        mon._keep([("status", word)], [messages.encode(word)], [time.time()])
        return [r["cleared_at"] is None for r in store.alerts() if r["kind"] == "offline"]

    assert keep(11, "online", "c1", "e1") == [] and keep(10, "offline", "c1", "e1") == [True]  # e1: online, its will
    assert keep(2, "online", "k1", "e2") == [False]  # re-imaged: its new numbering's first status
    assert keep(12, "offline", "c1", "e1") == [False]  # e1's clean stop, received late: no news
    assert store.latest_status()["d1"]["epoch"] == "e2" and "d1 went offline" in [a.text for a in mon.alerts]


def test_new_non_finite_answers_alert_once_with_or_without_a_fidelity_bound_and_not_again_after_a_restart(
        fleet_file, tmp_path):
    """``non_finite`` counts since the agent started: a device whose model once answered NaN stayed 'drifting'
    for good, a device without ``min_fidelity_snr_db`` was never told of NaN answers at all, and a new monitor
    would alert on answers counted long before it started."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    store = Store(tmp_path / "h.db")
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)  # d1: no fidelity bound

    def shadow(seq, non_finite, m=mon):
        msg = messages.envelope("shadow", "sim", "d1", seq, {**SHADOW, "non_finite": non_finite, "key_id": "k", "sig": "s"})
        m._after_store("shadow", messages.check_body("shadow", messages.decode(messages.encode(msg), "shadow")))
        return msg

    shadow(1, 0)
    shadow(2, 2)  # two new: alert
    shadow(3, 2)  # none new: the episode ends
    shadow(4, 5)  # three new: a second episode
    assert [a.text for a in mon.alerts if a.kind == "drift"] == [
        "d1: 2 live answers of int8 or of its shadow fp32 held NaN or infinity (shadow run's non_finite count)",
        "d1: 3 live answers of int8 or of its shadow fp32 held NaN or infinity (shadow run's non_finite count)"]

    store.add("shadow", shadow(5, 5))  # what the history holds when a new monitor starts
    later = Monitor(load_fleet(fleet_file), store, verify_in_child=False)
    try:
        later.start(timeout=0.5)  # no broker on port 1: it reads the history, then fails to connect
    except Exception:  # noqa: BLE001 - AgentError: only the history's part matters here
        pass
    shadow(6, 5, later)
    assert not [a for a in later.alerts if a.kind == "drift"]


def test_a_shadow_message_the_history_holds_already_raises_no_drift_alert_when_it_comes_again(fleet_file, tmp_path):
    """An agent restarted before its broker took a spooled shadow message sends it again: with an older, lower
    non_finite count than the newest one, it read as an agent started again, and its count as new NaN answers."""
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    store = Store(tmp_path / "h.db")
    mon = Monitor(load_fleet(fleet_file), store, verify_in_child=False)

    def shadow(seq, non_finite):
        msg = messages.envelope("shadow", "sim", "d1", seq, {**SHADOW, "non_finite": non_finite, "key_id": "k", "sig": "s"})
        return ("shadow", messages.check_body("shadow", messages.decode(messages.encode(msg), "shadow")))

    older = shadow(1, 3)
    for kind_msg in (older, shadow(2, 5), shadow(3, 5)):  # the last: nothing new, the episode ends
        mon._keep([kind_msg], [messages.encode(kind_msg[1])], [time.time()])
    assert len([a for a in mon.alerts if a.kind == "drift"]) == 1  # 3 new, then 2 more within the same episode
    mon._recent.clear()  # as after a restart of the monitor's worker: only the history remembers it
    mon._keep([older], [messages.encode(older[1])], [time.time()])
    assert len([a for a in mon.alerts if a.kind == "drift"]) == 1


def _drift_monitor(fleet_file, store):
    from edge_kit.fleet.inventory import load_fleet
    from edge_kit.telemetry.monitor import Monitor

    return Monitor(load_fleet(fleet_file), store, verify_in_child=False)  # d1: no fidelity bound


def _shadow(mon, seq: int, non_finite: int, run: str | None = None) -> dict:
    """Take the shadow message ``seq`` of d1 (``run``: its shadow run, None from an older agent) as stored; return it."""
    body = {**SHADOW, "non_finite": non_finite, "key_id": "k", "sig": "s", **({"run": run} if run else {})}
    msg = messages.check_body("shadow", messages.decode(messages.encode(messages.envelope("shadow", "sim", "d1", seq, body)),
                                                        "shadow"))
    mon._after_store("shadow", msg)
    return msg


def _nan_alerts(mon) -> list[int]:
    """Return the numbers of new NaN answers the drift alerts raised so far said."""
    return [int(a.text.split(": ")[1].split()[0].replace(",", "")) for a in mon.alerts if a.kind == "drift"]


@pytest.mark.parametrize("run", [None, "r1"])
def test_an_older_shadow_message_arriving_late_raises_no_drift_alert_and_keeps_the_count(fleet_file, tmp_path, run):
    """Shadow messages arrive out of order (a queued stream after a monitor outage, workers of a shared subscription):
    one older by seq with a lower non_finite count read as an agent started again, its count as new NaN answers (a
    false alert), and it replaced the count, so the next message's old answers were alerted on again."""
    mon = _drift_monitor(fleet_file, Store(tmp_path / "h.db"))
    _shadow(mon, 1, 0, run)
    _shadow(mon, 3, 4, run)  # four new: alert
    _shadow(mon, 4, 4, run)  # none new: the episode ends
    _shadow(mon, 2, 1, run)  # late: older than seq 4
    assert _nan_alerts(mon) == [4]
    _shadow(mon, 5, 6, run)  # two new since seq 4
    assert _nan_alerts(mon) == [4, 2]


def test_a_new_shadow_run_counts_from_zero_however_its_first_count_compares(fleet_file, tmp_path):
    """An agent started again (or a new shadow command) counts from 0: once recognised only by a lower count, so a
    new run that met as many or more NaN answers before its first message than the last run's count was alerted on
    for the difference, or not at all. The message's ``run`` says which shadow run counted."""
    mon = _drift_monitor(fleet_file, Store(tmp_path / "h.db"))
    _shadow(mon, 1, 3, "a")
    _shadow(mon, 2, 3, "a")  # the episode ends
    _shadow(mon, 3, 5, "b")  # the agent started again: five new, not two
    _shadow(mon, 4, 5, "b")
    _shadow(mon, 5, 0, "c")  # and again: none yet
    _shadow(mon, 6, 2, "c")  # then two new
    _shadow(mon, 7, 2, "c")
    _shadow(mon, 8, 1)  # an older agent's restart (no run): a lower count, all of it new
    assert _nan_alerts(mon) == [3, 5, 2, 1]


def test_a_monitor_started_again_takes_the_historys_newest_shadow_message_as_known(fleet_file, tmp_path):
    """A new monitor reads each device's newest shadow message from the history: an older one arriving then (queued
    while it was down, never stored) is no news, and the next message of that run alerts on its new answers only."""
    store = Store(tmp_path / "h.db")
    first = _drift_monitor(fleet_file, store)
    _shadow(first, 4, 4, "a")
    store.add("shadow", _shadow(first, 5, 4, "a"))  # no new answers: its episode ended (an open one would hold on)
    later = _drift_monitor(fleet_file, store)
    try:
        later.start(timeout=0.5)  # no broker on port 1: it reads the history, then fails to connect
    except Exception:  # noqa: BLE001 - AgentError: only the history's part matters here
        pass
    _shadow(later, 3, 1, "a")  # older, never stored before: no alert, and the count stays 4
    _shadow(later, 6, 7, "a")
    _shadow(later, 7, 7, "a")
    _shadow(later, 8, 2, "b")  # the agent started again after the monitor did
    assert _nan_alerts(later) == [3, 2]


def test_a_device_whose_seq_started_again_with_a_new_run_is_still_heard_and_a_late_message_of_an_ended_run_is_not(
        fleet_file, tmp_path):
    """A device whose spool started again (a damaged one moved aside, the device provisioned again) numbers its
    messages from 1: every shadow message it sent was taken as older than the last one and dropped, its NaN answers
    never alerted on (until its seq passed the old one). A new run is news whatever its seq; a late message of a run
    that has ended is not."""
    mon = _drift_monitor(fleet_file, Store(tmp_path / "h.db"))
    _shadow(mon, 500, 0, "old")  # a long-running agent
    _shadow(mon, 1, 0, "new")  # a new spool: seq starts again, a new run
    _shadow(mon, 2, 9, "new")  # nine NaN answers
    assert _nan_alerts(mon) == [9]
    _shadow(mon, 3, 9, "new")  # the episode ends
    _shadow(mon, 499, 7, "old")  # late, from the run that has ended: no news
    _shadow(mon, 4, 10, "new")  # one new since seq 3
    assert _nan_alerts(mon) == [9, 1]


def test_a_device_claiming_another_profile_is_reported_under_its_fleet_profile(tmp_path, run_cli):
    """A record's ``profile`` is its device's word. d1, an rpi4 in the fleet file, sent records claiming rpi5: the
    report plotted it among the rpi5 devices and averaged its 1e11 mJ into their energy bar (5e10 mJ shown for
    what the real rpi5 measured at 0.5). The fleet file places each device it names; and a bar is the median over
    devices, so one compromised device of the same profile cannot move it either."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit}\ndevices:\n"
                          + "".join(f"  - {{name: {n}, host: 127.0.0.{i}, profile: {p}}}\n" for i, (n, p) in
                                    enumerate((("d1", "rpi4"), ("d2", "rpi5"), ("d3", "rpi5"), ("d4", "rpi5")), 1)))

    def bench(device, seq, mj, claimed="rpi5"):
        record = {**_bench("int8", seq), "device": device, "profile": claimed}
        return ("bench", {**record, "power": {**record["power"], "energy_per_inference_mj": mj}})

    store = Store(history_path(fleet_file))
    store.add_many([bench("d1", 1, 1e11), bench("d2", 2, 0.5), bench("d3", 3, 0.7), bench("d4", 4, 1e11)])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["profiles"] == ["rpi4", "rpi5"]
    page = (tmp_path / "r.html").read_text()
    rpi4, rpi5 = page.split("<h2>rpi4</h2>")[1].split("<h2>rpi5</h2>")
    assert "devices: d1</p>" in rpi4 and "devices: d2, d3, d4</p>" in rpi5
    assert '"y":[0.7]' in rpi5.split("energy per inference")[0] and "median over devices" in rpi5
    assert "<tr><td>d1</td><td>rpi4</td>" in page


def test_a_device_inventing_variant_names_cannot_flood_the_reports_plots(fleet_file, run_cli, tmp_path):
    """A device signing records of thousands of invented variant names had each plotted as a trace of its own:
    the legend of its profile's plots (shared with every other device of the profile) held thousands of entries,
    the page grew with them. Each device's newest MAX_VARIANTS_PER_DEVICE (32) names are plotted, the rest counted."""
    MAX_VARIANTS_PER_DEVICE = 32
    store = Store(history_path(fleet_file))
    store.add_many([("bench", {**_bench(f"v{i}", i), "sha256": f"{i:064x}"}) for i in range(MAX_VARIANTS_PER_DEVICE + 40)])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["records"] == MAX_VARIANTS_PER_DEVICE and info["not_plotted"] == {"d1": 40}
    page = (tmp_path / "r.html").read_text()
    assert f"d1: 40 benchmark record(s) of more than {MAX_VARIANTS_PER_DEVICE} variant names not plotted" in page
    newest = MAX_VARIANTS_PER_DEVICE + 39
    assert f'"name":"v{newest} (' in page and '"name":"v0 (' not in page
    from edge_kit.telemetry.report import MAX_VARIANTS_PER_DEVICE as limit

    assert limit == MAX_VARIANTS_PER_DEVICE


def test_one_devices_fp32_accuracy_does_not_move_its_profiles_accuracy_floor(fleet_file, run_cli, tmp_path):
    """The plot's min-accuracy line is the profile's ratio times the devices' fp32 accuracy: the mean, so one device
    reporting fp32 at 0 % moved the line every other device of the profile is judged against on the page
    (0.99 x 60 % instead of 0.99 x 90 %). It is the median over the devices."""
    fleet_file.write_text(fleet_file.read_text() + "  - {name: d2, host: 127.0.0.2}\n  - {name: d3, host: 127.0.0.3}\n")
    store = Store(history_path(fleet_file))
    store.add_many([("bench", {**_bench("fp32", i), "device": d, "accuracy": {"value": acc}})
                    for i, (d, acc) in enumerate((("d1", 0.0), ("d2", 0.9), ("d3", 0.9)), 1)])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "min accuracy 0.99 x fp32 = 89.1 %" in page and "x fp32 = 59.4 %" not in page


def test_an_onnx_only_profiles_accuracy_floor_is_drawn_from_onnx_fp32(fleet_file, run_cli, tmp_path):
    """The min-accuracy line was drawn from the devices' fp32 records alone: an ONNX model compiled for ONNX Runtime
    and TensorRT variants alone (onnx-fp32 its reference, no fp32 built) had no line on its profile's plot. It is
    drawn from onnx-fp32 then, as selection judges those variants, and says so."""
    store = Store(history_path(fleet_file))
    store.add_many([("bench", {**_bench(v, i), "sha256": f"{i:064x}", "accuracy": {"value": acc}})
                    for i, (v, acc) in enumerate((("onnx-fp32", 0.9), ("onnx-int8", 0.8)), 1)])
    store.close()
    code, out, err = run_cli("report", "--fleet", fleet_file, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert "min accuracy 0.99 x onnx-fp32 = 89.1 %" in (tmp_path / "r.html").read_text()


def test_gap_alerts_a_device_can_raise_one_per_record_are_capped_on_the_screen_as_refused_ones_are():
    """The monitor now alerts every sequence gap; a device numbering its records 1, 3, 5... raises one per record, as
    junk raises one refusal per message. At most MAX_REFUSED_SHOWN are printed a refresh, the rest counted in one
    line; a device's offline alert still shows."""
    from edge_kit.cli.loop import MAX_REFUSED_SHOWN, alert_lines
    from edge_kit.telemetry.monitor import Alert

    alerts = [Alert("d1", "gap", f"d1: 1 bench record(s) never arrived (seq {2 * i})") for i in range(100)]
    alerts.insert(50, Alert("d2", "offline", "d2 went offline"))
    lines = alert_lines(alerts, len(alerts))
    assert "[red]alert[/] d2 went offline" in lines
    assert len([ln for ln in lines if "never arrived" in ln]) == MAX_REFUSED_SHOWN
    assert lines[-1].startswith(f"[red]alert[/] {100 - MAX_REFUSED_SHOWN} more sequence gaps (counted in the --json")
    assert len(lines) == MAX_REFUSED_SHOWN + 2


def test_the_power_and_live_series_help_says_where_the_figures_came_from():
    """curl /metrics showed "Average power during the latest benchmark (W)" and "Requests the serving API answered
    ... (live)": neither said the power may be an estimate, which its source label names, nor who counted the live
    figures."""
    metrics = FleetMetrics()
    metrics.observe("bench", _bench("int8", 1))
    helps = {ln.split()[2]: ln for ln in generate_latest(metrics.registry).decode().splitlines()
             if ln.startswith("# HELP edgekit_")}
    for name in ("edgekit_power_watts", "edgekit_energy_per_inference_mj"):
        assert "source label says where it came from" in helps[name] and "'estimated'" in helps[name], helps[name]
    for name in ("edgekit_live_requests", "edgekit_live_errors", "edgekit_live_latency_ms",
                 "edgekit_live_shadow_snr_db", "edgekit_live_queue_depth"):
        assert "the device's serving API, from its latest signed live message" in helps[name], helps[name]
