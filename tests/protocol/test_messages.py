"""Topics, envelopes and command checking shared by host and agent."""

from __future__ import annotations

import json

import pytest

from edgekit_protocol import commands, messages
from edgekit_protocol.commands import CommandError, parse_command


def cmd_bytes(**over) -> bytes:
    msg = commands.command("f1", "d1", "bench", {"variant": "int8"})
    msg.update(over)
    return json.dumps(msg).encode()


def test_topics_are_built_and_parsed_in_one_place():
    t = messages.topic("f1", "d1", "cmd/ack")
    assert t == "edgekit/v1/f1/d1/cmd/ack" and messages.parse_topic(t) == ("f1", "d1", "cmd/ack")
    assert messages.subscription("f1", "bench") == "edgekit/v1/f1/+/bench"
    assert messages.subscription("f1", "bench", share="mon") == "$share/mon/edgekit/v1/f1/+/bench"
    with pytest.raises(messages.MessageError):
        messages.parse_topic("edgekit/v1/f1/d1/nope")
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        messages.check_name("a/b", "device")


def test_envelope_round_trip_and_unique_ids():
    a = messages.envelope("bench", "f1", "d1", 7, {"variant": "int8"})
    b = messages.envelope("bench", "f1", "d1", 8, {})
    assert a["msg_id"] != b["msg_id"] and a["schema"] == "edgekit.bench/1" and a["seq"] == 7
    assert messages.decode(messages.encode(a), "bench") == a
    with pytest.raises(messages.MessageError, match="does not belong on 'status'"):
        messages.decode(messages.encode(a), "status")


@pytest.mark.parametrize("payload, message", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1, 2]", "JSON list, expected an object"),
    (b"{" * 100_000, "over the 65536-byte limit"),
    (b"[" * 10_000 + b"]" * 10_000, "not UTF-8 JSON"),
    (json.dumps({"schema": "edgekit.cmd/1"}).encode(), "field 'device' is missing"),
    (cmd_bytes(seq="1"), "field 'seq' has type str"),
    (cmd_bytes(seq=True), "field 'seq' has type bool"),
])
def test_malformed_payloads_are_refused_with_the_reason(payload, message):
    with pytest.raises(CommandError, match=message):
        parse_command(payload, "f1", "d1")


@pytest.mark.parametrize("over, message", [
    ({"device": "d2"}, "for f1/d2 reached f1/d1"),
    ({"command": "reboot"}, "unknown command 'reboot'"),
    ({"args": []}, "args must be an object"),
    ({"args": {"variant": 3}}, "'variant' must be str"),
    ({"args": {"min_runs": 0}}, "between 1 and 1000000"),
    ({"args": {"min_runs": 2.5}}, "'min_runs' must be int"),
    ({"args": {"bogus": 1}}, "unknown argument 'bogus'"),
    ({"command": "activate", "args": {}}, "give 'variant' or 'sha256'"),
])
def test_commands_are_checked_before_they_run(over, message):
    with pytest.raises(CommandError, match=message) as info:
        parse_command(cmd_bytes(**over), "f1", "d1")
    assert info.value.cmd_id  # the error ack can name the command


def test_a_good_command_parses():
    cmd = parse_command(cmd_bytes(args={"variant": "int8", "min_seconds": 0.5}), "f1", "d1")
    assert cmd.name == "bench" and cmd.args == {"variant": "int8", "min_seconds": 0.5}


def test_the_host_cannot_send_what_the_agent_would_refuse():
    """The one spec: ``command()`` (what the host sends) checks the arguments ``parse_command`` enforces."""
    with pytest.raises(CommandError, match="bench: argument 'threads' must be between 1 and 64, got 0"):
        commands.command("f1", "d1", "bench", {"threads": 0})
    with pytest.raises(CommandError, match="unknown command 'reboot'"):
        commands.command("f1", "d1", "reboot")


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}'])
def test_non_finite_numbers_are_refused_at_parse_time(text):
    with pytest.raises(messages.MessageError, match="non-finite number"):
        messages.decode(text.encode())
