"""Topics, envelopes and command checking shared by host and agent."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit_protocol import commands, messages
from edgekit_protocol.commands import CommandError, parse_command

SIGNED = {"key_id": "0" * 16, "sig": "c2ln"}  # the protocol checks their form; identity.py checks them


def cmd_bytes(**over) -> bytes:
    msg = {**commands.command("f1", "d1", "bench", {"variant": "int8"}, expires=time.time() + 60), **SIGNED}
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
    with pytest.raises(ValueError, match="^the device name is empty; give the device's name"):
        messages.check_name("", "device")


def test_envelope_round_trip_and_unique_ids():
    a = {**messages.envelope("bench", "f1", "d1", 7, {"variant": "int8"}), **SIGNED}
    b = messages.envelope("bench", "f1", "d1", 8, {})
    assert a["msg_id"] != b["msg_id"] and a["schema"] == "edgekit.bench/1" and a["seq"] == 7
    assert messages.decode(messages.encode(a), "bench") == a
    with pytest.raises(messages.MessageError, match="does not belong on 'status'"):
        messages.decode(messages.encode(a), "status")
    for bad in ("", "x" * 129, "id\n2026 ERROR forged", "\x1b]52;c;cHdu\x07", "[link=file:///etc]x"):
        with pytest.raises(messages.MessageError, match="'msg_id' must be 1 to 128 letters"):
            messages.decode(messages.encode({**a, "msg_id": bad}), "bench")


@pytest.mark.parametrize("payload, message", [
    (b"\xff\xfe", r"^malformed command: payload is not UTF-8 \(byte 0: invalid start byte\)$"),
    (b"ping", r"^malformed command: payload is not JSON \(Expecting value at line 1, column 1\)$"),  # UTF-8, not JSON: not "not UTF-8"
    (b"\xef\xbb\xbf{}", r"^malformed command: payload is not JSON \(a byte order mark before the value at line 1, column 1\)$"),
    (b"[1, 2]", "JSON list, expected an object"),
    (b"{" * 100_000, "over the 65536-byte limit"),
    (b"[" * 10_000 + b"]" * 10_000, "payload is nested too deeply"),  # past the parser: said so, not "not JSON"
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


@pytest.mark.parametrize("over, message", [
    ({"expires": None}, "expires must be a unix time"),
    ({"expires": 1e400}, "overflows to infinity"),
    ({"expires": time.time() + 2 * 86_400}, "at most 86400"),
    ({"sig": None}, "field 'sig' is missing"),
])
def test_every_command_is_signed_in_form_and_expires_within_a_day(over, message):
    payload = cmd_bytes(**over) if over.get("expires") != 1e400 else cmd_bytes().replace(b'"expires": ', b'"expires": 1e400, "x": ')
    with pytest.raises(CommandError, match=message):
        parse_command(payload, "f1", "d1")


@pytest.mark.parametrize("payload, message", [
    (b'{"a": 1' + b"0" * 5000 + b"}", "payload holds an integer too long to read"),  # Python's limit: 4,300 digits
    (cmd_bytes().replace(b'"seq": 0', b'"seq": 9223372036854775808'), "'seq' is out of range"),
    (cmd_bytes().replace(b'"ts": ', b'"ts": 1' + b"0" * 400 + b', "x": '), "not a plausible unix time"),
    (cmd_bytes().replace(b'"expires": ', b'"expires": 1' + b"0" * 400 + b', "x": '), "expires must be a unix time"),
])
def test_numbers_too_large_for_arithmetic_are_refused_not_raised(payload, message):
    with pytest.raises(CommandError, match=message):
        parse_command(payload, "f1", "d1")


def test_the_canonical_form_covers_everything_but_the_signature_in_one_order():
    a = {"b": 1, "a": {"y": 2, "x": [1.5, "é"]}, "sig": "whatever"}
    assert messages.canonical(a) == '{"a":{"x":[1.5,"é"],"y":2},"b":1}'.encode()
    assert messages.canonical(dict(reversed(list(a.items())))) == messages.canonical(a)
    with pytest.raises(ValueError):
        messages.canonical({"a": float("nan")})


def test_a_timestamp_from_the_future_is_refused_but_clock_lag_is_not():
    now = time.time()
    assert messages.check_time({"ts": now - 3600}, now)  # a device whose clock lags, or a spool replay
    assert messages.check_time({"ts": now + 60}, now)  # within the allowed skew
    with pytest.raises(messages.MessageError, match="ahead of the receiver's clock"):
        messages.check_time({"ts": 4_102_444_800.0}, now)


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


@pytest.mark.parametrize("text, why", [('[NaN]', "meta.json holds the non-finite number NaN"),
                                       ('{"a": 1e999}', "meta.json holds 1e999, which overflows to infinity"),
                                       ('{"a": 1, "a": 2}', "meta.json holds the key 'a' twice"),
                                       ('{"a": ', r"meta.json is not JSON \(Expecting value at line 1, column 7\)"),
                                       (b'"\xff"', r"meta.json is not UTF-8 \(byte 1: invalid start byte\)")])
def test_strict_loads_refuses_what_no_encoder_gives_back_naming_what_it_read(text, why):
    """The receivers' parsing, for any JSON an agent reads (a file on its disk may be damaged or edited by hand)."""
    with pytest.raises(messages.MessageError, match=f"^{why}"):
        messages.strict_loads(text, "meta.json")
    assert messages.strict_loads(b'{"a": [1.5, "x"]}') == {"a": [1.5, "x"]}
    for held in (bytearray(b'{"a": 1}'), memoryview(b'{"a": 1}')):  # a receive buffer, as bytes are: no TypeError
        assert messages.strict_loads(held) == {"a": 1}


@pytest.mark.parametrize("text, where", [
    (r'"variant": "int8\u0000"', "field 'variant'"),
    (r'"variant": "\ud800"', "field 'variant'"),
    (r'"live": {"model": {"variant": "a\udfffb"}}', "field 'live'.'model'.'variant'"),
    (r'"errors": ["ok", "\u0000"]', r"field 'errors'\[1\]"),
    (r'"x\u0000": 1', "a key of payload"),
])
def test_a_nul_or_a_lone_surrogate_in_any_string_is_refused_where_it_is(text, where):
    """PostgreSQL's text columns refuse NUL and a lone surrogate has no UTF-8 form (signing, storing, printing
    it raises): refused at decode, naming where, so no receiver meets one."""
    good = messages.encode(messages.envelope("bench", "f1", "d1", 1, {"key_id": "k", "sig": "s"}))
    payload = good[:-1] + b"," + text.encode() + b"}"
    with pytest.raises(messages.MessageError, match=f"{where} holds a NUL character or a lone UTF-16 surrogate"):
        messages.decode(payload)


def test_escapes_that_are_valid_text_are_kept():
    """A surrogate pair (an emoji) and an escaped backslash before u0000 are valid text: decoded as sent."""
    good = messages.encode(messages.envelope("bench", "f1", "d1", 1, {"key_id": "k", "sig": "s"}))
    payload = good[:-1] + rb',"a": "\ud83d\ude00", "b": "\\u0000", "c": "\u00e9"}'
    message = messages.decode(payload)
    assert (message["a"], message["b"], message["c"]) == ("\U0001f600", "\\u0000", "\u00e9")


def test_objects_or_lists_nested_deeper_than_the_limit_are_refused_at_decode_with_the_reason():
    """Nesting was bounded only by the parser's recursion limit, so a payload nested ~990 deep parsed and then
    broke every later step that encodes it again (signing, verifying its canonical form)."""
    m = messages.envelope("telemetry", "f", "d1", 1, {"conditions": {}, "spool": {}, "key_id": "k", "sig": "s"})
    for depth, refused in ((messages.MAX_DEPTH - 1, False), (messages.MAX_DEPTH, True), (900, True)):
        raw = messages.encode(m)[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"
        if refused:
            with pytest.raises(messages.MessageError, match=f"deeper than {messages.MAX_DEPTH} levels"):
                messages.decode(raw)
        else:
            assert messages.decode(raw)["x"]
    wide = {**m, "x": [[{"a": [1]}] for _ in range(500)]}  # many containers, shallow: taken
    assert messages.decode(messages.encode(wide))["x"][499] == [{"a": [1]}]


def test_a_key_twice_in_one_object_is_refused_at_decode_naming_it():
    """json.loads keeps the last of two equal keys; a reader of the stored bytes that keeps the first (SQLite's
    json_extract, jq and others do) would read another value than the one verified. Such a payload is refused."""
    m = messages.encode(messages.envelope("bench", "f", "d1", 1, {"variant": "int8", "key_id": "k", "sig": "s"}))
    for raw in (b'{"variant":"fp32",' + m[1:], m[:-1] + b',"power":{"avg_w":1,"avg_w":2}}'):
        with pytest.raises(messages.MessageError, match="key '(variant|avg_w)' twice"):
            messages.decode(raw)
    assert messages.decode(m)["variant"] == "int8"


LIVE = {"source": "live", "model": {"sha256": "a" * 64, "variant": "int8"}, "requests": 40, "errors": 1, "window": 40,
        "queue_depth": 0, "latency_ms": {"p50": 0.8, "p90": 1.0, "p99": 1.25}, "clock": "perf_counter_ns"}
SHADOW = {"model": {"sha256": "b" * 64, "variant": "fp32"}, "serving": {"sha256": "a" * 64, "variant": "int8"},
          "share": 0.1, "compared": 30, "window": 30, "errors": 0, "dropped_queue_full": 2,
          "fidelity": {"snr_db": -3.5, "cosine": 0.9, "max_abs_error": 0.2, "mean_abs_error": 0.01}}


@pytest.mark.parametrize("kind, body", [("live", LIVE), ("shadow", SHADOW), ("live", {**LIVE, "latency_ms": None}),
                                        ("shadow", {**SHADOW, "fidelity": None})])
def test_live_and_shadow_have_topics_schemas_and_checked_bodies(kind, body):
    """The serving API's figures and a shadow run's comparison travel on their own topics (DESIGN's contract),
    each with its schema; a body that fits passes the check every receiver runs."""
    t = messages.topic("f1", "d1", kind)
    assert t == f"edgekit/v1/f1/d1/{kind}" and messages.parse_topic(t) == ("f1", "d1", kind)
    msg = {**messages.envelope(kind, "f1", "d1", 3, body), **SIGNED}
    assert msg["schema"] == f"edgekit.{kind}/1"
    assert messages.check_body(kind, messages.decode(messages.encode(msg), kind)) == msg
    with pytest.raises(messages.MessageError, match=f"does not belong on '{kind}'"):
        messages.decode(messages.encode({**msg, "schema": "edgekit.telemetry/1"}), kind)


@pytest.mark.parametrize("kind, field, text", [
    ("live", "latency_ms", '{"p50": NaN}'), ("live", "latency_ms", '{"p99": Infinity}'), ("live", "requests", "1e999"),
    ("shadow", "fidelity", '{"snr_db": -Infinity}'), ("shadow", "share", "NaN")])
def test_a_non_finite_live_or_shadow_figure_is_refused_at_parse_time(kind, field, text):
    msg = {**messages.envelope(kind, "f1", "d1", 3, LIVE if kind == "live" else SHADOW), **SIGNED}
    raw = messages.encode({**msg, field: "X"}).replace(b'"X"', text.encode())
    with pytest.raises(messages.MessageError, match="non-finite number|overflows to infinity"):
        messages.decode(raw, kind)


@pytest.mark.parametrize("kind, over, why", [
    ("live", {"requests": -1}, "live: requests is not a whole number"),
    ("live", {"window": 2 ** 63}, "live: window is not a whole number"),
    ("live", {"latency_ms": {"p90": -0.5}}, r"live: latency_ms.p90 is not a non-negative number"),
    ("live", {"latency_ms": {"p99": 10 ** 13}}, r"live: latency_ms.p99 is not a non-negative number"),
    ("live", {"model": None}, "live: field 'model' is missing"),
    ("live", {"model": {"sha256": 5}}, "live: model is not an object with text variant and sha256"),
    ("shadow", {"serving": []}, "shadow: field 'serving' is list"),
    ("shadow", {"fidelity": {"cosine": "high"}}, r"shadow: fidelity.cosine is not a number"),
    ("shadow", {"fidelity": {"mean_abs_error": -1e-3}}, r"shadow: fidelity.mean_abs_error is not a non-negative number"),
    ("shadow", {"share": -0.1}, "shadow: share is not a number from 0 to 1"),
    ("shadow", {"dropped_queue_full": True}, "shadow: dropped_queue_full is not a whole number"),
])
def test_a_live_or_shadow_figure_out_of_range_is_refused_naming_it(kind, over, why):
    msg = messages.envelope(kind, "f1", "d1", 3, {**(LIVE if kind == "live" else SHADOW), **over})
    with pytest.raises(messages.MessageError, match=why):
        messages.check_body(kind, msg)



@pytest.mark.parametrize("error", [3.4e38, 2e12, 10 ** 300])
def test_a_shadow_error_figure_of_any_finite_size_is_taken(error):
    """A model with huge outputs, or a served variant far off its reference, measures an error above 1e12: it was
    refused as out of range, so the drift alert never saw the device it exists for. Error figures take any
    number a float holds; NaN and the infinities are still refused at parse time, a whole number too big for a
    float and a negative error at the body check."""
    body = {**SHADOW, "fidelity": {"snr_db": -40.0, "cosine": 0.1, "max_abs_error": error, "mean_abs_error": error}}
    msg = {**messages.envelope("shadow", "f1", "d1", 3, body), **SIGNED}
    assert messages.check_body("shadow", messages.decode(messages.encode(msg), "shadow"))["fidelity"]["max_abs_error"] == error
    for text in (b"NaN", b"Infinity", b"1e999"):
        with pytest.raises(messages.MessageError, match="finite"):
            messages.decode(messages.encode(msg).replace(str(error).encode(), text, 1))
    for bad in (10 ** 400, -error, float("inf")):
        with pytest.raises(messages.MessageError, match="fidelity.max_abs_error is not a non-negative number"):
            messages.check_body("shadow", {**msg, "fidelity": {"max_abs_error": bad}})
    with pytest.raises(messages.MessageError, match="fidelity.snr_db is not a number"):  # other figures keep the limit
        messages.check_body("shadow", {**msg, "fidelity": {"snr_db": 2e12}})


@pytest.mark.parametrize("name", ["model\n", "m" * 63 + "\n"])
def test_a_name_ending_in_a_newline_is_no_model_device_or_fleet_name(name):
    # `$` matches before a final newline: such a name would make a folder, a store path and an ACL line apart
    with pytest.raises(ValueError):
        messages.check_model_name(name)
    with pytest.raises(ValueError):
        messages.check_name(name, "device")


@pytest.mark.parametrize("interval, ok", [(30.0, True), (0.2, True), (86400, True), (None, True), (0, False),
                                          (-5.0, False), (86401, False), (1e300, False), ("30", False), (True, False)])
def test_a_telemetry_interval_is_optional_and_seconds_above_0_up_to_a_day(interval, ok):
    """An agent says the interval it sends telemetry at (how long a silence means it stopped); an older one says
    none. One that says something else is refused, naming the field."""
    body = {"conditions": {}, "spool": {}, **({"interval_s": interval} if interval is not None else {})}
    msg = {**messages.envelope("telemetry", "f1", "d1", 3, body), **SIGNED}
    if ok:
        assert messages.check_body("telemetry", messages.decode(messages.encode(msg), "telemetry")) == msg
        assert messages.telemetry_interval(msg) == interval
    else:
        with pytest.raises(messages.MessageError, match="telemetry: interval_s is not a number of seconds above 0 "
                                                        "and at most 86400"):
            messages.check_body("telemetry", msg)
        assert messages.telemetry_interval(msg) is None


def test_a_message_is_encoded_for_sending_up_to_the_payload_limit_and_refused_past_it():
    """The one size check every sender makes (the host's commands and desired states, the agent's messages): at the
    limit it is the encoded payload; one byte over, PayloadTooLarge naming the message, its size and the limit."""
    from edgekit_protocol.errors import PayloadTooLarge

    base = len(messages.encode({"x": ""}))
    fits = {"x": "a" * (messages.MAX_PAYLOAD - base)}
    assert messages.encode_within_limit(fits, "m") == messages.encode(fits)
    assert len(messages.encode_within_limit(fits, "m")) == messages.MAX_PAYLOAD
    with pytest.raises(PayloadTooLarge) as info:
        messages.encode_within_limit({"x": "a" * (messages.MAX_PAYLOAD - base + 1)}, "pi-1: the bench command",
                                     "shorten its arguments")
    assert str(info.value) == ("pi-1: the bench command of 65,537 bytes is over the protocol's 65,536-byte limit: "
                               "not sent; shorten its arguments")
    assert info.value.exit_code == 2


def test_decoding_and_the_canonical_form_build_no_json_coder_per_message(monkeypatch):
    """The monitor decodes every message, its verifier encodes every canonical form and an agent encodes every
    message it publishes: json.loads and json.dumps
    given options build a decoder (and its scanner) or an encoder on each call, a third of decoding a bench record.
    The strict decoder and the canonical encoder are built once; what they refuse and produce is unchanged."""
    msg = {**messages.envelope("bench", "f", "d", 1, {"variant": "int8", "latency_ms": {"p50": 1.5}}), "key_id": "k", "sig": "s"}
    payload = messages.encode(msg)
    form = json.dumps({k: v for k, v in msg.items() if k != "sig"}, sort_keys=True, separators=(",", ":")).encode()
    messages.decode(payload, "bench")  # the strict decoder is built at its first use (whichever test runs first)
    built = []
    for cls in (json.JSONDecoder, json.JSONEncoder):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__", (lambda init: lambda self, *a, **k: built.append(self) or init(self, *a, **k))(init))
    for _ in range(10):
        assert messages.decode(payload, "bench") == msg
        assert messages.canonical(msg) == form
        assert messages.encode(msg) == payload
    assert built == []


@pytest.mark.parametrize("payload", [b'\xef\xbb\xbf{"schema": "edgekit.bench/1"}', b'{"a": 1} {"b": 2}', b'{"a": 1e400}',
                                     b'{"a": ' + b"9" * 200 + b'e200}', b'{"a": -Infinity}', b'{"a": 1, "a": 2}'])
def test_what_json_loads_refused_the_strict_decoder_refuses(payload):
    with pytest.raises(messages.MessageError):
        messages.decode(payload)


@pytest.mark.parametrize("seqs, ok", [(None, True), ({}, True), ({"bench": 200, "live": 0, "shadow": 7}, True),
                                      ({"bench": -1}, False), ({"bench": 1.5}, False), ({"bench": True}, False),
                                      ({"status": 3}, False), ({"bench": 10**13}, False), ([1, 2], False)])
def test_a_telemetry_s_seq_marks_are_optional_whole_numbers_of_the_marked_kinds(seqs, ok):
    """A telemetry message carries the newest seq its agent gave its bench, live and shadow records, so a receiver
    sees records lost at the end of a stream; an older agent sends none. Anything else there is refused, naming it."""
    body = {"conditions": {}, "spool": {}, **({"seqs": seqs} if seqs is not None else {})}
    msg = {**messages.envelope("telemetry", "f1", "d1", 3, body), **SIGNED}
    if ok:
        assert messages.check_body("telemetry", messages.decode(messages.encode(msg), "telemetry")) == msg
        assert messages.telemetry_marks(msg) == (seqs or {})
    else:
        with pytest.raises(messages.MessageError, match="telemetry: seqs is not an object of bench, live, shadow"):
            messages.check_body("telemetry", msg)
        assert messages.telemetry_marks(msg) == {}


_JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_MARK_KEYS = st.sampled_from([*messages.MARKED_KINDS, "status", "telemetry", "reported", "", "BENCH"])
_MARK_VALUES = (st.integers(min_value=-2**70, max_value=2**70) | st.integers(min_value=0, max_value=10**12)
                | st.sampled_from([0, 10**12, 10**12 + 1, -1, 2**63, 1e12, 1.0, True, False]) | _JSON)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_MARK_KEYS, _MARK_VALUES, max_size=4) | _JSON)
def test_fuzz_any_seqs_a_telemetry_message_carries_is_refused_or_whole_numbers_of_the_marked_kinds(seqs):
    """Whatever a device signs as its telemetry's ``seqs`` (the monitor records gaps from it): the decoder refuses it in
    one line, or every mark is a whole number from 0 to 1e12 of a marked kind, read back the same; never a crash."""
    msg = {**messages.envelope("telemetry", "f1", "d1", 3, {"conditions": {}, "spool": {}, "seqs": seqs}), **SIGNED}
    try:
        got = messages.check_body("telemetry", messages.decode(messages.encode(msg), "telemetry"))
    except messages.MessageError as exc:
        assert "\n" not in str(exc)
        assert seqs is not None and messages.telemetry_marks(msg) != seqs
        return
    marks = messages.telemetry_marks(got)
    assert (seqs is None and marks == {}) or marks == seqs
    assert all(k in messages.MARKED_KINDS and type(v) is int and 0 <= v <= 10**12 for k, v in marks.items())


@pytest.mark.parametrize("epoch, ok", [(None, True), ("0123456789abcdef", True), ("a", True), ("x" * 64, True),
                                       ("", False), ("x" * 65, False), ("new line\n", False), ("a b", False),
                                       (7, False), ({"a": 1}, False)])
def test_an_epoch_is_optional_text_of_up_to_64_id_characters(epoch, ok):
    """A message carries the numbering its seq belongs to (``epoch``: random, created with the agent's spool) so a
    receiver tells a device numbering from 1 again from one that lost records; an older agent sends none."""
    msg = {**messages.envelope("live", "f1", "d1", 3, {"requests": 1}, epoch=epoch if isinstance(epoch, str) else None),
           **SIGNED}
    if epoch is not None:
        msg["epoch"] = epoch
    if ok:
        got = messages.decode(messages.encode(msg), "live")
        assert messages.message_epoch(got) == epoch and ("epoch" in got) == (epoch is not None)
    else:
        with pytest.raises(messages.MessageError, match="^field 'epoch' must be 1 to 64 letters, digits"):
            messages.decode(messages.encode(msg), "live")
        assert messages.message_epoch(msg) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | _JSON)
def test_fuzz_any_epoch_a_message_carries_is_refused_in_one_line_or_read_back_the_same(epoch):
    """Whatever a device signs as its ``epoch`` (the monitor keys its sequence marks and the history its restarts on
    it): refused in one line, or an epoch of 1 to 64 id characters read back the same; never a crash."""
    msg = {**messages.envelope("live", "f1", "d1", 3, {"requests": 1}), **SIGNED, "epoch": epoch}
    try:
        payload = messages.encode(msg)
    except ValueError:  # no JSON form (a lone surrogate): nothing a device can send
        return
    try:
        got = messages.decode(payload, "live")
    except messages.MessageError as exc:
        assert "\n" not in str(exc)
        assert messages.message_epoch(msg) is None
        return
    assert messages.message_epoch(got) == epoch and isinstance(epoch, str) and 0 < len(epoch) <= 64
