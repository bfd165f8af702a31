"""The agent's config model: one model for both sides, checked the same way wherever it comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit_protocol.config import (
    AgentConfig,
    BrokerConfig,
    Node,
    StoreConfig,
    build,
    to_plain,
)
from edgekit_protocol.errors import ConfigError


def test_what_the_host_writes_the_agent_reads_back_unchanged():
    cfg = AgentConfig(device="pi-1", fleet="f", root=Path("/opt/edgekit"),
                      broker=BrokerConfig(host="mqtt.local", port=8883, password_file=Path("/etc/edgekit/mqtt.pass")),
                      store=StoreConfig(max_store_mb=64))
    assert build(Node.plain(to_plain(cfg)), "agent.yaml") == cfg


@pytest.mark.parametrize("plain, message", [
    ({"device": "d", "fleet": "f", "broker": {"port": 70000}}, "agent.yaml: broker: port 70000 is not between 1 and 65535"),
    # the broker's passwd is 'user:hash' lines: `fleet revoke` could not remove such a user (it said 'removed
    # already' and left it), and a line break added a line of the name's own to the file
    ({"device": "d", "fleet": "f", "broker": {"username": "pi:1"}}, "agent.yaml: broker: username 'pi:1' is not a broker "
                                                                     "user name: give one without ':' or control characters"),
    ({"device": "d", "fleet": "f", "broker": {"username": "pi\nops:$7$x"}}, r"broker: username 'pi\\nops:"),
    ({"device": "d", "fleet": "f", "broker": {"username": ""}}, "broker: username '' is not a broker user name"),
    ({"device": "d", "fleet": "f", "telemetry_interval_s": float("nan")}, "telemetry_interval_s: expected a finite number"),
    ({"device": "d", "fleet": "f", "telemetry_interval_s": 90000}, "telemetry_interval_s is 90000; at most 86400 s"),
    ({"device": "d", "fleet": "f", "store": {"max_store_mb": -1}}, "store.max_store_mb must be positive"),
    ({"device": "d", "fleet": "f", "stor": {}}, "stor: unknown key; did you mean 'store'?"),
    # every benchmark would be ended at its total (and counted as a model that looped): the timed runs last longer
    ({"device": "d", "fleet": "f", "bench": {"total_timeout_s": 5}},
     "bench: total_timeout_s 5 is not above min_seconds 10: the timed runs alone last that long"),
])
def test_bad_values_name_the_key(plain, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        build(Node.plain(plain), "agent.yaml")


def test_one_password_file_rule(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    assert BrokerConfig(password_file=tmp_path / "pw").password() == "s3cret"
    assert BrokerConfig().password() is None
    with pytest.raises(ConfigError, match="fleet.yaml: broker.password_file .*/missing: No such file"):
        BrokerConfig(password_file=tmp_path / "missing").password("fleet.yaml")


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_password_file_that_is_a_fifo_or_too_big_is_one_line_naming_it(tmp_path, kind, unblocked):
    """broker.password_file was read with a plain read_text: a FIFO there held whoever loaded the config (the agent,
    bench, monitor) waiting for a writer for ever, and a file of gigabytes was read whole. Now one line naming it."""
    import os

    path = tmp_path / "pw"
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        with open(path, "wb") as f:
            f.truncate(65536)
    caught = unblocked(lambda: BrokerConfig(password_file=path).password("agent.yaml"), path, 30,
                       "reading broker.password_file")
    why = ("not a regular file; create it holding the broker password alone (`edgekit fleet init` wrote each user's in "
           "its secrets/ folder), readable by this user, or fix broker.password_file in agent.yaml") if kind == "fifo" \
        else "over the 65,535 bytes such a file may take"
    assert isinstance(caught, ConfigError), caught
    assert str(caught) == f"agent.yaml: broker.password_file {path}: {why}"


def test_a_config_check_works_out_each_dataclass_type_hints_once(monkeypatch):
    """A deploy checks each device's agent.yaml with build(): typing.get_type_hints evaluated every annotation of
    every config dataclass each time (2 ms of the host's CPU per device)."""
    import typing

    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda cls, *a, **k: calls.append(cls) or real(cls, *a, **k))
    plain = to_plain(AgentConfig(device="pi-1", fleet="f", store=StoreConfig(max_store_mb=64)))
    build(Node.plain(plain), "agent.yaml")
    build(Node.plain({**plain, "device": "pi-2"}), "agent.yaml")
    assert len(calls) == len(set(calls))
