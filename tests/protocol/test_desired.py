"""The desired and reported bodies: what a receiver refuses before anything uses it."""

from __future__ import annotations

import pytest

from edgekit_protocol.desired import (
    Desired,
    check_reported,
    parse_desired,
    reported_body,
)
from edgekit_protocol.errors import MessageError

SHA = "a" * 64


def good() -> dict:
    return {"msg_id": "m", **Desired(msg_id="m", rollout="r", revision=5, store="http://s.example", model="digits",
                                     variant="int8", sha256=SHA, bytes=10).body()}


def test_a_desired_body_round_trips_and_bad_fields_are_named():
    d = parse_desired(good())
    assert d.revision == 5 and d.sha256 == SHA and d.store == "http://s.example"
    for change, field in (({"sha256": "../x"}, "sha256"), ({"revision": 0}, "revision"), ({"revision": True}, "revision"),
                          ({"store": "file:///etc"}, "store"), ({"bytes": 2 ** 41}, "bytes"), ({"variant": "a/b"}, "'/'"),
                          ({"fetch": {"max_bytes_s": -1}}, "max_bytes_s"), ({"fetch": {"start_delay_s": 1e9}}, "start_delay_s"),
                          ({"keep": ["x"]}, "keep"), ({"eval": "x"}, "eval")):
        with pytest.raises(MessageError, match=field):
            parse_desired({**good(), **change})


@pytest.mark.parametrize("model", ["my model", "../x", ".hidden", "a/b", "x" * 129, "caf\u00e9"])
def test_a_desired_model_name_outside_the_one_rule_is_refused(model):
    """A desired state took any model name of up to 512 characters without '/' or a leading '.': 'my model', which
    compile, publish and the device's store refuse, passed. Now the one rule (check_model_name) applies."""
    with pytest.raises(MessageError, match="desired: field 'model': model name .* must be 1-128 letters"):
        parse_desired({**good(), "model": model})
    assert parse_desired({**good(), "model": "m" * 128}).model == "m" * 128


@pytest.mark.parametrize("store", ["http://[::1", "http://s.example:99999", "http://", "https:///path"])
def test_a_store_url_with_no_host_or_that_does_not_parse_is_refused(store):
    """`rollout start --store http://[::1` raised urllib's ValueError (a traceback) on the host, and a device given
    such a store would have failed in its fetch: both sides refuse it here."""
    with pytest.raises(MessageError, match="is not an http:// or https:// URL"):
        parse_desired({**good(), "store": store})
    assert parse_desired({**good(), "store": "http://[::1]:8080/store"}).store == "http://[::1]:8080/store"


def test_a_reported_body_with_nonsense_inside_is_refused():
    ok = reported_body(parse_desired(good()), "converged", {"sha256": SHA, "variant": "int8", "model": "digits", "bytes": 10},
                       download={"bytes": 10, "resumed": False, "seconds": 0.5})
    assert check_reported(ok) is ok
    for change, field in (({"download": {"bytes": "12"}}, "download.bytes"), ({"download": {"seconds": -1}}, "download.seconds"),
                          ({"download": {"resumed": 1}}, "download.resumed"), ({"current": {"bytes": "9"}}, "current.bytes"),
                          ({"previous": {"sha256": 5}}, "previous.sha256"), ({"attempt": -1}, "attempt"),
                          ({"state": "done"}, "state"), ({"revision": -1}, "revision")):
        with pytest.raises(MessageError, match=field):
            check_reported({**ok, **change})


def test_a_reported_error_or_name_is_bounded_a_device_truncates_and_a_receiver_refuses_more():
    """A reported message's `error` (and its model references' names) went into the operator's history and
    terminal table at any length: a compromised device could send megabytes per report. The agent now cuts
    its error to MAX_ERROR_CHARS and the host refuses anything longer, named."""
    from edgekit_protocol.desired import MAX_ERROR_CHARS

    d = parse_desired(good())
    long = reported_body(d, "failed", None, error="x" * (MAX_ERROR_CHARS * 3))
    assert len(long["error"]) == MAX_ERROR_CHARS and long["error"].endswith("…") and check_reported(long) is long
    with pytest.raises(MessageError, match=f"'error' is longer than {MAX_ERROR_CHARS}"):
        check_reported({**long, "error": "x" * 10_000_000})
    with pytest.raises(MessageError, match="current.variant is longer"):
        check_reported({**long, "current": {"sha256": SHA, "variant": "v" * 10_000}})


def test_a_hold_round_trips_and_nothing_else_passes_for_one():
    hold = parse_desired({"msg_id": "h", **Desired.holding("r", 7).body()})
    assert hold.hold and (hold.rollout, hold.revision, hold.msg_id) == ("r", 7, "h")
    assert Desired.holding("r", 7).body() == {"rollout": "r", "revision": 7, "hold": True}
    assert reported_body(hold, "converged", {"sha256": SHA})["want"] is None
    assert not parse_desired(good()).hold
    for bad in ({"hold": False}, {"hold": 1}, {"rollout": ""}, {"revision": 0}):
        with pytest.raises(MessageError, match="hold is|revision"):
            parse_desired({"msg_id": "h", **Desired.holding("r", 7).body(), **bad})


def test_every_revision_is_bounded_by_one_check_with_one_text():
    """The revision bound was written out three times in this module (desired, hold, reported) and three more in
    the rollout driver, each with its own text. One function now: desired states and holds take 1..MAX_REVISION,
    a report 0..MAX_REVISION (0: it took none yet), and what is refused reads the same."""
    from edgekit_protocol.desired import MAX_REVISION, check_revision

    assert check_revision(MAX_REVISION) == MAX_REVISION and check_revision(0, "reported", lowest=0) == 0
    text = f"field 'revision' is not an integer from 1 to {MAX_REVISION} (2**63 - 1)"
    hold = {"msg_id": "h", **Desired.holding("r", 7).body()}
    ok = reported_body(parse_desired(good()), "converged", {"sha256": SHA})
    for bad in (0, -1, MAX_REVISION + 1, True, 1.0, "5", None):
        for parse, body in ((parse_desired, good()), (parse_desired, hold)):
            with pytest.raises(MessageError) as caught:
                parse({**body, "revision": bad})
            assert str(caught.value) == f"desired: {text}"
        if bad != 0:
            with pytest.raises(MessageError) as caught:
                check_reported({**ok, "revision": bad})
            assert str(caught.value) == f"reported: {text.replace('from 1', 'from 0')}"
    assert check_reported({**ok, "revision": 0})["revision"] == 0


def test_a_desired_state_naming_the_model_as_its_own_eval_set_is_refused_at_once():
    """eval.sha256 equal to sha256 passed: the agent downloaded one file for both, the install moved it away as the
    model and then could not copy it as the eval set, and the device failed every retry with "cannot install ...:
    No such file or directory", naming neither the field nor what to do."""
    with pytest.raises(MessageError, match="desired: eval.sha256 is the model's own sha256"):
        parse_desired({**good(), "eval": {"sha256": SHA, "bytes": 10}})
    assert parse_desired({**good(), "eval": {"sha256": "b" * 64, "bytes": 10}}).eval_sha256 == "b" * 64
