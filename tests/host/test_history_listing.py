"""What the history kept that no figure shows, listed row by row (`edgekit history refused` / `gaps`, the report's
table of the newest), the report reading the history's newest messages once, and a reader never changing the
schema of a history (`edgekit history upgrade` does)."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from edge_kit.telemetry.store import SCHEMA_VERSION, Store

HOSTILE_DEVICE = "dev1<b onmouseover=alert(1)>[red]x"  # no / in a topic segment
HOSTILE_TOPIC = f"edgekit/v1/f/{HOSTILE_DEVICE}/bench"
NOW = time.time()  # set again at each test's start (_now)


@pytest.fixture(autouse=True)
def _now():
    """Set :data:`NOW` to this test's start: at module import, a test run half an hour after collection (a loaded CI
    run) saw its rows of "1 h ago" inside a window of 90 to 150 min ago. Return nothing."""
    global NOW
    NOW = time.time()


def _history(path):
    """A history with three refused messages and three gaps, 3 h, 2 h and 1 h ago (this host's clock)."""
    store = Store(path)
    store.add_invalid("edgekit/v1/f/dev1/status", "signed by a key that is not dev1's", b'{"seq": 1}')
    store.add_invalid("edgekit/v1/f/dev2/bench", "malformed: seq is not an integer", b"\xff\xfe")
    store.add_invalid(HOSTILE_TOPIC, "<img src=x onerror=alert(2)> \x1b[31mred", b"{}")
    store.add_gap("dev1", "bench", 5, 9)
    store.add_gap("dev2", "live", 1, 1)
    store.add_gap("dev1", "status", 20, 21)
    for table, key in (("invalid", "id"), ("gaps", "first_missing")):
        rows = store._rows(f"SELECT {key} FROM {table} ORDER BY {key}" if table == "invalid" else
                           "SELECT first_missing FROM gaps ORDER BY rowid")
        for hours, (k,) in zip((3, 2, 1), rows):
            store._execute(f"UPDATE {table} SET ts = ? WHERE {key} = ?", (NOW - hours * 3600, k))
    store.close()
    return path


def _listed(run_cli, kind: str, history, *filters) -> list[dict]:
    """Return the rows `edgekit history KIND --history HISTORY FILTERS... --json` lists (it exits 0)."""
    code, out, err = run_cli("history", kind, "--history", history, *filters, "--json")
    assert code == 0, err
    return json.loads(out)[kind]


def test_refused_messages_are_listed_newest_first_by_device_and_time_window(tmp_path, run_cli):
    history = _history(tmp_path / "h.db")
    rows = _listed(run_cli, "refused", history)
    assert [r["device"] for r in rows] == [HOSTILE_DEVICE, "dev2", "dev1"]  # the device each topic names, newest first
    assert rows[0]["topic"] == HOSTILE_TOPIC and rows[0]["reason"] == "<img src=x onerror=alert(2)> \\x1b[31mred"
    assert rows[1] == {"ts": pytest.approx(NOW - 7200), "device": "dev2", "topic": "edgekit/v1/f/dev2/bench",
                       "reason": "malformed: seq is not an integer", "bytes": 2, "payload": "\\xff\\xfe"}
    dev1 = _listed(run_cli, "refused", history, "--device", "dev1")
    assert [r["topic"] for r in dev1] == ["edgekit/v1/f/dev1/status"]
    code, out, _ = run_cli("history", "refused", "--history", history, "--since", "150m", "--until", "90m", "--json")
    assert [r["device"] for r in json.loads(out)["refused"]] == ["dev2"]
    assert json.loads(out)["filters"]["since"] == "150m"
    assert [r["topic"] for r in _listed(run_cli, "refused", history, "--limit", "1")] == [HOSTILE_TOPIC]

    code, out, err = run_cli("history", "refused", "--history", history)
    text = " ".join(out.split())
    assert code == 0, err
    assert "[red]x" in text and "\x1b" not in out  # a sender's markup shown as text, its escape codes escaped
    assert "signed by a key that is not dev1's" in text and "3 refused message(s) from" in text
    code, out, _ = run_cli("history", "refused", "--history", history, "--limit", "1")
    assert "the 1 newest: older ones with a larger --limit" in " ".join(out.split())
    code, out, _ = run_cli("history", "refused", "--history", history, "--device", "dev1", "--since", "1m")
    assert code == 0 and "no refused message(s) in" in out  # a device the history knows, with no row in the window


def test_sequence_gaps_are_listed_newest_first_by_device_and_time_window(tmp_path, run_cli):
    history = _history(tmp_path / "h.db")
    rows = _listed(run_cli, "gaps", history)
    assert [(r["device"], r["kind"], r["first_missing"], r["last_missing"], r["missing"]) for r in rows] == [
        ("dev1", "status", 20, 21, 2), ("dev2", "live", 1, 1, 1), ("dev1", "bench", 5, 9, 5)]
    assert [r["kind"] for r in _listed(run_cli, "gaps", history, "--device", "dev1", "--until", "90m")] == ["bench"]
    code, out, err = run_cli("history", "gaps", "--history", history, "--device", "dev2")
    text = " ".join(out.split())
    assert code == 0 and "dev2 live 1..1 1" in text and "1 sequence gap(s) from" in text, err


@pytest.mark.parametrize("command", ["refused", "gaps", "alerts"])
def test_a_device_neither_the_fleet_file_nor_the_history_knows_is_one_line_exit_2(tmp_path, run_cli, command):
    """`edgekit history refused --device nosuch` listed nothing, exit 0: a mistyped name read as a device with nothing
    to show. A device the fleet file names (silent so far) or that any row of the history names is still listed."""
    history = _history(tmp_path / "edgekit-history.db")
    (tmp_path / "fleet.yaml").write_text("fleet: f\ndefaults: {user: u, profile: rpi4}\ndevices:\n"
                                         "  - {name: dev1, host: h}\n  - {name: quiet, host: h}\n")
    code, out, err = run_cli("history", command, "--fleet", tmp_path / "fleet.yaml", "--device", "dev11", "--json")
    assert code == 2 and err.count("\n") == 1, err
    assert json.loads(out)["error"] == (f"--device 'dev11': not a device of {tmp_path / 'fleet.yaml'}, and no row of "
                                        f"the history {history} names it; did you mean 'dev1'? leave --device out to "
                                        "list every device's rows")
    code, out, err = run_cli("history", command, "--history", history, "--device", "nosuch")
    assert code == 2 and out == "" and err == (f"edgekit: error: --device 'nosuch': no row of the history {history} "
                                               "names it; check the name; leave --device out to list every device's "
                                               "rows\n")
    for known in (["--fleet", tmp_path / "fleet.yaml", "--device", "quiet"], ["--history", history, "--device", "dev2"]):
        code, out, err = run_cli("history", command, *known, "--json")
        assert code == 0 and command in json.loads(out), err


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "0001-01-01"])  # the second a date no unix time holds here: a traceback
def test_a_time_that_reads_as_neither_a_span_nor_a_date_is_one_line_naming_the_option(tmp_path, run_cli, option, value):
    history = _history(tmp_path / "h.db")
    code, out, err = run_cli("history", "gaps", "--history", history, option, value)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"edgekit: error: {option} '{value}': give a span back from now (30m, 2h, 7d) or a date-time")


def test_the_report_lists_the_newest_refused_messages_and_gaps_as_text_never_as_html(tmp_path, run_cli):
    history = _history(tmp_path / "h.db")
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    section = page[page.index("<h2>Refused messages and sequence gaps</h2>"):]
    assert "<b onmouseover" not in section and "<img src=x" not in section  # a forger's topic and reason: text
    assert "dev1&lt;b onmouseover=alert(1)&gt;[red]x" in section and "&lt;img src=x onerror=alert(2)&gt;" in section
    assert "<td>dev1</td><td>status</td><td>20..21</td>" in section  # the newest gap first
    assert section.index("edgekit/v1/f/dev2/bench") < section.index("edgekit/v1/f/dev1/status")  # newest first
    assert (json.loads(out)["refused"], json.loads(out)["gaps"]) == (3, 3)


def test_an_empty_history_has_no_refused_section(tmp_path, run_cli):
    Store(tmp_path / "h.db").close()
    code, _, err = run_cli("report", "--history", tmp_path / "h.db", "--out", tmp_path / "r.html")
    assert code == 0, err
    assert "Refused messages" not in (tmp_path / "r.html").read_text()


def test_the_report_reads_each_of_the_historys_newest_views_once(tmp_path, monkeypatch):
    """build_report read latest_status, latest_bench and latest_live three times each (plots, fleet table, --json
    rows), and the newest decisions twice: a monitor writing meanwhile could give the parts different messages."""
    from edge_kit.telemetry.report import build_report

    store = Store(tmp_path / "h.db")
    calls: dict[str, int] = {}
    for name in ("latest_status", "latest_bench", "latest_live"):
        real = getattr(store, name)
        monkeypatch.setattr(store, name, lambda real=real, name=name, *a: calls.update({name: calls.get(name, 0) + 1})
                            or real(*a))
    real_decisions = store.latest_decisions
    monkeypatch.setattr(store, "latest_decisions", lambda kinds=None, **k: calls.update(
        {f"latest_decisions{kinds or ''}": calls.get(f"latest_decisions{kinds or ''}", 0) + 1}) or real_decisions(kinds, **k))
    build_report(store, tmp_path / "r.html")
    assert calls == {"latest_status": 1, "latest_bench": 1, "latest_live": 1, "latest_decisions": 1,
                     "latest_decisions('fleet selection',)": 1}


def _old_history(path):
    """A history file as edge-kit wrote it before its schema had a version (invalid without its device column)."""
    store = Store(path)
    store.add_invalid("edgekit/v1/f/dev1/bench", "forged", b"{}")
    store.add_invalid("not/a/topic", "unparsable topic", b"")
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE edgekit_schema")
        conn.execute("DROP INDEX invalid_device")
        conn.execute("ALTER TABLE invalid DROP COLUMN device")
    conn.close()
    return path


def _schema(path):
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(invalid)")}
    conn.close()
    return tables, columns


FLEET = "fleet: f\ndefaults: {user: u, profile: rpi4}\ndevices:\n  - {name: a, host: h}\n"
READERS = {"report": ("report", "--out", "r.html"), "history refused": ("history", "refused"),
           "history gaps": ("history", "gaps"), "fleet status": ("fleet", "status", "--fleet", "fleet.yaml",
                                                                 "--history-only")}


@pytest.mark.parametrize("command", READERS)
def test_a_reader_upgrades_an_older_history_it_may_write_and_reads_it(tmp_path, run_cli, monkeypatch, command):
    """Readers were made to change no schema (a role with SELECT alone may read), and so refused a history the previous
    edge-kit wrote, a file its own user may write: "run `edgekit history upgrade`", where opening it upgraded it
    before. A reader that may write upgrades it, as before; one that may not is refused (test_history_unwritable)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.yaml").write_text(FLEET)
    history = _old_history(tmp_path / "h.db")
    code, out, err = run_cli(*READERS[command], "--history", history)
    assert code == 0 and "edgekit history upgrade" not in err, err
    assert "edgekit_schema" in _schema(history)[0] and "device" in _schema(history)[1]  # upgraded, as a writer would
    with sqlite3.connect(history) as conn:
        assert conn.execute("SELECT version FROM edgekit_schema WHERE name = 'history'").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


def test_history_upgrade_brings_an_older_history_up_to_date_and_fills_each_refused_messages_device(tmp_path, run_cli):
    history = _old_history(tmp_path / "h.db")
    code, out, err = run_cli("history", "upgrade", "--history", history, "--json")
    assert code == 0, err
    assert json.loads(out) == {"history": str(history), "schema_version": SCHEMA_VERSION}
    assert "edgekit_schema" in _schema(history)[0] and "device" in _schema(history)[1]
    code, out, err = run_cli("history", "refused", "--history", history, "--json")
    assert code == 0, err
    assert [(r["device"], r["topic"]) for r in json.loads(out)["refused"]] == [(None, "not/a/topic"),
                                                                              ("dev1", "edgekit/v1/f/dev1/bench")]
    code, out, err = run_cli("history", "upgrade", "--history", tmp_path / "missing.db")
    assert code == 2 and "missing.db: no history store" in err and not (tmp_path / "missing.db").exists()


def test_rollout_list_and_resume_upgrade_an_older_history_they_may_write(tmp_path, run_cli):
    """`rollout resume` and `abort` write into the history they find, and `status` and `list` only read: on an older
    schema in a file their user may write, all of them upgrade it (as any writer does), none asks for `edgekit history
    upgrade`."""
    (tmp_path / "fleet.yaml").write_text(FLEET)
    for command in ("list", "resume"):
        history = _old_history(tmp_path / f"{command}.db")
        code, _, err = run_cli("rollout", command, *(["r1"] if command == "resume" else []), "--fleet",
                               tmp_path / "fleet.yaml", "--history", history)
        assert "edgekit history upgrade" not in err and "edgekit_schema" in _schema(history)[0], err
        assert code == 0 or command == "resume", err  # resume: no rollout r1, said in its own line


def _alerts_history(path):
    """A history whose alerts table holds dev1's cleared silence (3 h ago), a hostile device's drift that holds (2 h
    ago) and dev2's low disk that holds (1 h ago)."""
    with Store(path) as store:
        store.open_alert("dev1", "silent", "dev1 silent for 200 s", at=NOW - 3 * 3600)
        store.close_alert("dev1", "silent", at=NOW - 3 * 3600 + 60)
        store.open_alert(HOSTILE_DEVICE, "drift", "<img src=x onerror=alert(2)> \x1b[31mred", at=NOW - 2 * 3600)
        store.open_alert("dev2", "low_disk", "dev2: 1.0 MB free (below 32 MB)", at=NOW - 3600)
    return path


def test_alerts_are_listed_newest_first_by_device_time_window_and_whether_they_hold(tmp_path, run_cli):
    """The history kept no alerts: which had been raised, and when they cleared, was nowhere to read."""
    history = _alerts_history(tmp_path / "h.db")
    rows = _listed(run_cli, "alerts", history)
    assert [(r["device"], r["kind"], r["cleared_at"] is None) for r in rows] == [
        ("dev2", "low_disk", True), (HOSTILE_DEVICE, "drift", True), ("dev1", "silent", False)]
    assert rows[1]["detail"] == "<img src=x onerror=alert(2)> \\x1b[31mred"  # kept escaped
    assert rows[2]["raised_at"] == pytest.approx(NOW - 3 * 3600) and rows[2]["cleared_at"] == pytest.approx(NOW - 10740)
    code, out, _ = run_cli("history", "alerts", "--history", history, "--open", "--json")
    assert [r["device"] for r in json.loads(out)["alerts"]] == ["dev2", HOSTILE_DEVICE]
    assert json.loads(out)["filters"]["holds"] is True
    assert [r["kind"] for r in _listed(run_cli, "alerts", history, "--device", "dev1")] == ["silent"]
    assert [r["kind"] for r in _listed(run_cli, "alerts", history, "--since", "150m", "--until", "90m")] == ["drift"]
    assert [r["device"] for r in _listed(run_cli, "alerts", history, "--limit", "1")] == ["dev2"]

    code, out, err = run_cli("history", "alerts", "--history", history)
    text = " ".join(out.split())
    assert code == 0, err
    assert "[red]x" in text and "\x1b" not in out and "holds" in text and "3 alert(s) from" in text
    code, out, _ = run_cli("history", "alerts", "--history", history, "--open", "--device", "dev1")
    assert code == 0 and "no open alert(s) in" in out
    code, out, err = run_cli("history", "alerts", "--history", history, "--since", "yesterday")
    assert code == 2 and out == "" and err.startswith("edgekit: error: --since 'yesterday': give a span back from now")


def test_the_report_lists_the_alerts_that_hold_and_the_newest_cleared_as_text_never_as_html(tmp_path, run_cli):
    history = _alerts_history(tmp_path / "h.db")
    code, out, err = run_cli("report", "--history", history, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["alerts_holding"] == 2
    page = (tmp_path / "r.html").read_text()
    section = page[page.index("<h2>Alerts</h2>"):]
    assert "<img src=x" not in section and "<b onmouseover" not in section  # a device's text: shown as text
    assert "&lt;img src=x onerror=alert(2)&gt; \\x1b[31mred" in section
    holding = section.index("dev2: 1.0 MB free"), section.index("onerror=alert(2)"), section.index("dev1 silent for")
    assert list(holding) == sorted(holding)  # those that hold first, newest first, then the cleared ones
    assert section.count("<span class=bad>holds</span>") == 2
    Store(tmp_path / "empty.db").close()
    code, _, err = run_cli("report", "--history", tmp_path / "empty.db", "--out", tmp_path / "e.html")
    assert code == 0 and "<h2>Alerts</h2>" not in (tmp_path / "e.html").read_text(), err


def test_the_report_counts_every_alert_that_holds_not_only_the_hundred_it_lists(tmp_path, run_cli):
    """The report's alerts section listed the 100 newest open alerts and counted those it listed: with 130 holding,
    the page said "the 100 that hold now (the 100 newest)" and --json alerts_holding 100."""
    from edge_kit.telemetry.report import MAX_OPEN_ALERTS

    path = tmp_path / "h.db"
    with Store(path) as store:
        for i in range(MAX_OPEN_ALERTS + 30):
            assert store.open_alert(f"dev{i}", "silent", f"dev{i} silent for 300 s", NOW - 3600 + i)
    code, out, err = run_cli("report", "--history", path, "--out", tmp_path / "r.html", "--json")
    assert code == 0, err
    assert json.loads(out)["alerts_holding"] == MAX_OPEN_ALERTS + 30
    section = (tmp_path / "r.html").read_text().split("<h2>Alerts</h2>", 1)[1]
    assert f"the {MAX_OPEN_ALERTS + 30} that hold now (the {MAX_OPEN_ALERTS} newest listed)" in section
    assert section.count("<span class=bad>holds</span>") == MAX_OPEN_ALERTS


@pytest.mark.parametrize("kind,what", [("refused", "refused message(s)"), ("gaps", "sequence gap(s)"),
                                       ("alerts", "alert(s)")])
def test_an_empty_listing_names_the_filters_given_and_none_when_none_was(tmp_path, run_cli, kind, what):
    """An empty history said "no refused message(s) in h.db for these filters" with no filter given."""
    history = _history(tmp_path / "h.db") if kind != "alerts" else tmp_path / "h.db"
    Store(history).close()
    if kind != "alerts":  # rows 1 to 3 h old: none in the last minute; an empty history for the unfiltered line
        code, out, err = run_cli("history", kind, "--history", history, "--device", "dev1", "--since", "1m")
        assert code == 0, err
        assert " ".join(out.split()) == f"no {what} in {history} for --device dev1, --since 1m"
        history = tmp_path / "empty.db"
        Store(history).close()
    code, out, err = run_cli("history", kind, "--history", history)
    assert code == 0, err
    assert " ".join(out.split()) == f"no {what} in {history}"
    if kind == "alerts":
        code, out, err = run_cli("history", kind, "--history", history, "--open", "--until", "1m")
        assert " ".join(out.split()) == f"no open {what} in {history} for --until 1m", err
