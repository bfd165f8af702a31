"""The serving API's loopback HTTP/JSON endpoint: the same server, model, limits, errors and figures as the socket."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import numpy as np
import pytest

from device_agents.config import load_agent_config
from device_agents.serving import Client, ServingError
from device_agents.serving.http import parse_inputs
from device_agents.serving.server import Interpreters, Server
from device_agents.store import ModelStore
from edgekit_protocol.errors import ConfigError

make = Interpreters()


@pytest.fixture
def store(tmp_path, digits_artifacts):
    store = ModelStore(tmp_path / "root")
    manifest = json.loads((digits_artifacts / "manifest.json").read_text())
    store.shas = {art["id"]: store.install(digits_artifacts / art["file"], variant=art["id"], model="digits").sha256
                  for art in manifest["artifacts"] if art["status"] == "built"}
    store.activate(store.shas["int8"])
    return store


@pytest.fixture
def server(store):
    srv = Server(store.root / "serve.sock", make_interpreter=make, max_clients=4, max_payload=1 << 16,
                 http_port=0).start()
    srv.serve_model(store.model_path(store.shas["int8"]), store.shas["int8"], "int8")
    yield srv
    srv.close()


def call(server, method, path, body=None, headers=None, timeout=10):
    """Return (status, parsed JSON answer) of one request on a new connection."""
    conn = http.client.HTTPConnection(*server.http_address, timeout=timeout)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def samples(n=4):
    return np.random.default_rng(0).uniform(0, 16, size=(n, 8, 8, 1)).astype(np.float32)


def test_http_is_off_by_default_and_the_port_is_checked(tmp_path, caplog):
    caplog.set_level("INFO", logger="edgekit.agent.serve")
    srv = Server(tmp_path / "off.sock", make_interpreter=make).start()
    try:
        assert srv.http_address is None
    finally:
        srv.close()
    on = Server(tmp_path / "on.sock", make_interpreter=make, http_port=0).start()
    on.close()
    # the log says where an application reaches the API (it said nothing: the HTTP port only in agent.yaml)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving API on")] == [
        f"serving API on {tmp_path / 'off.sock'}",
        f"serving API on {tmp_path / 'on.sock'} and http://127.0.0.1:{on.http_address[1]}"]
    cfg = tmp_path / "a.yaml"
    cfg.write_text("device: pi-1\nfleet: f\n")
    assert load_agent_config(cfg).serve.http_port is None
    cfg.write_text("device: pi-1\nfleet: f\nserve: {http_port: 8089}\n")
    assert load_agent_config(cfg).serve.http_port == 8089
    cfg.write_text("device: pi-1\nfleet: f\nserve:\n  http_port: 70000\n")
    with pytest.raises(ConfigError, match=r"a.yaml:4: serve.*http_port 70000 is not between 1 and 65535"):
        load_agent_config(cfg)


def test_predict_and_model_answer_as_the_socket_api_does_and_count_in_the_live_figures(store, server):
    host, port = server.http_address
    assert host == "127.0.0.1" and port > 0  # loopback only
    status, info = call(server, "GET", "/v1/model")
    with Client(store.root) as client:
        socket_info = client.info()
        x = samples()
        over_socket = [client.predict({"image": s})["output_0"] for s in x]
    assert status == 200 and info["model"] == socket_info["model"] and info["inputs"] == socket_info["inputs"]
    before = server.snapshot()["requests"]
    for s, expected in zip(x, over_socket):
        status, answer = call(server, "POST", "/v1/predict", {"inputs": {"image": s.tolist()}})
        assert status == 200 and answer["model"] == {"sha256": store.shas["int8"], "variant": "int8"}
        np.testing.assert_array_equal(np.array(answer["outputs"]["output_0"], np.float32), expected)
    live = server.snapshot()
    assert live["requests"] == before + len(x) and live["errors"] == 0
    # one keep-alive connection, several requests; a batch axis of 1 is accepted as on the socket
    conn = http.client.HTTPConnection(*server.http_address, timeout=10)
    for s in x[:2]:
        conn.request("POST", "/v1/predict", body=json.dumps({"inputs": {"image": s[None].tolist()}}))
        answer = conn.getresponse()
        assert answer.status == 200 and len(json.loads(answer.read())["outputs"]["output_0"]) == 10
    conn.close()


@pytest.mark.parametrize("body, status, message", [
    (b"{nope", 400, "malformed request: the body is not JSON"),
    (b'{"inputs": {"image": [NaN]}}', 400, "not JSON"),  # NaN, Infinity: refused while parsing
    (b'{"inputs": {"image": [[[1e999]]]}}', 400, "holds NaN or infinity"),  # too large for a float: infinity
    (b'[1, 2]', 400, 'the body must be {"inputs"'),
    (b'{"inputs": {}}', 400, 'the body must be {"inputs"'),
    (b'{"inputs": {"image": [[1, 2], [3]]}}', 400, "not a rectangular array of numbers"),
    (b'{"inputs": {"image": [["a", "b"]]}}', 400, "not a rectangular array of numbers"),  # wrong dtype
    (b'{"inputs": {"image": [{"x": 1}]}}', 400, "not a rectangular array of numbers"),
    # numbers as text, true/false and null were taken as numbers (1.5, 1.0, NaN): a client's bug answered
    (json.dumps({"inputs": {"image": np.full((8, 8, 1), "1.5").tolist()}}).encode(), 400,
     r"input 'image': not a rectangular array of numbers \(it holds text\)"),
    (json.dumps({"inputs": {"image": np.full((8, 8, 1), True).tolist()}}).encode(), 400,
     r"not a rectangular array of numbers \(it holds true or false\)"),
    (b'{"inputs": {"image": [1, null]}}', 400, r"not a rectangular array of numbers \(it holds null"),
    # true or false among numbers: numpy reads [1, true] as [1, 1]
    (b'{"inputs": {"image": [[[1], [true]], [[0.5], [2]]]}}', 400,
     r"input 'image': not a rectangular array of numbers \(it holds true or false\)"),
    (b'{"inputs": {"image": [1' + b"0" * 400 + b']}}', 400, "input 'image' holds a number too large for a float"),
    (json.dumps({"inputs": {"image": np.zeros((8, 8)).tolist()}}).encode(), 400,
     r"input 'image': shape \[8, 8\], the model takes \[8, 8, 1\]"),  # the socket API's text
    (json.dumps({"inputs": {"image": np.zeros((8, 8, 1)).tolist(), "other": [1]}}).encode(), 400,
     "unknown input 'other'"),
    # refused before it is read: over what the model's 64 inputs can need as JSON (under max_payload's 65536)
    (b"[" * 100_000 + b"]" * 100_000, 413, r"over the 22528-byte limit \(the served model's 64 input numbers"),
    (json.dumps({"inputs": {"image": np.zeros((10, 10, 1)).tolist()}}).encode(), 400, "shape"),
])
def test_bad_requests_get_the_reason_and_the_server_keeps_answering(store, server, body, status, message):
    got, answer = call(server, "POST", "/v1/predict", body)
    assert got == status and answer["ok"] is False, answer
    assert __import__("re").search(message, answer["error"]), answer["error"]
    ok, good = call(server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})
    assert ok == 200 and len(good["outputs"]["output_0"]) == 10


def test_deep_nesting_missing_length_wrong_paths_and_methods(wait, store, server):
    status, answer = call(server, "POST", "/v1/predict", b"[" * 10_000 + b"]" * 10_000)
    assert status == 400 and "malformed request" in answer["error"]
    assert call(server, "GET", "/v1/nope")[0] == 404
    assert call(server, "GET", "/v1/predict")[0] == 405
    assert call(server, "POST", "/v1/model", b"{}")[0] == 405
    with socket.create_connection(server.http_address, timeout=10) as raw:  # no Content-Length
        raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")
    with socket.create_connection(server.http_address, timeout=10) as raw:  # a client that goes away mid-body
        raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{\"inputs\"")
    # the cut request is noticed by the server's thread, after the client left
    assert wait(lambda: server.snapshot()["turned_away"]["malformed"] >= 3), server.snapshot()
    assert server.snapshot()["turned_away"]["malformed"] == 3  # 400 (nesting), 411, the cut body; not 404/405
    assert call(server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})[0] == 200


def raw_request(server, data: bytes) -> tuple[int, dict | None]:
    """Send ``data`` on a new connection; return the answer's status and JSON body (None: no answer)."""
    with socket.create_connection(server.http_address, timeout=10) as raw:
        raw.sendall(data)
        got = b""
        while chunk := raw.recv(65536):
            got += chunk
    if not got:
        return 0, None
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_web_page_in_a_browser_on_the_device_is_refused(store, server):
    """A page whose name the browser re-resolved to 127.0.0.1 (DNS rebinding: its own name in Host)
    and a cross-site page posting text/plain (no preflight; its Origin) are both refused with 403
    before anything runs; loopback names and origins, with or without a port, are answered."""
    body = json.dumps({"inputs": {"image": samples(1)[0].tolist()}}).encode()
    port = server.http_address[1]
    for headers in [f"Host: evil.example:{port}\r\nOrigin: http://evil.example:{port}",
                    f"Host: 127.0.0.1.evil.example:{port}",
                    f"Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example",
                    f"Host: 127.0.0.1:{port}\r\nOrigin: null"]:
        status, answer = raw_request(server, f"POST /v1/predict HTTP/1.1\r\n{headers}\r\nContent-Type: text/plain\r\n"
                                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert status == 403 and "is not the loopback" in answer["error"], (headers, answer)
    status, answer = raw_request(server, b"GET /v1/model HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 403 and "model" not in answer
    assert server.snapshot()["requests"] == 0 and server.snapshot()["turned_away"]["malformed"] == 5
    for host, origin in [(f"127.0.0.1:{port}", None), ("localhost", f"http://localhost:{port}"), ("[::1]", None)]:
        status, _ = call(server, "POST", "/v1/predict", body, headers={"Host": host, **({"Origin": origin} if origin else {})})
        assert status == 200, host


def test_other_methods_and_requests_that_are_not_http_are_answered_in_json_not_an_html_page(store, server):
    """PUT, DELETE, HEAD, OPTIONS were answered 501 with the standard library's HTML page, and a request line
    that is not HTTP with an HTML 400 (no status line at all for a one-word line), uncounted: a client that
    parses {"ok": false, "error"} got neither. Now 405 naming the endpoints, and 400/505 counted as malformed."""
    port = server.http_address[1]
    for method in ("PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"):
        with socket.create_connection(server.http_address, timeout=10) as raw:
            raw.sendall(f"{method} /v1/model HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
            got = b""
            while chunk := raw.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405") and b"\r\nAllow: GET, POST\r\n" in head, (method, head)
        assert json.loads(body) == {"ok": False, "error": f"method '{method}' is not allowed: use GET /v1/model or "
                                                          "POST /v1/predict"}
    assert server.snapshot()["turned_away"]["malformed"] == 0  # the wrong method, as 404/405: not counted
    for line, status, reason in [(b"GARBAGE", 400, "Bad request syntax ('GARBAGE')"),
                                 (b"GET /v1/model HTTP/9.9", 505, "Invalid HTTP version (9.9)")]:
        got_status, answer = raw_request(server, line + b"\r\n\r\n")
        assert got_status == status and answer == {"ok": False, "error": f"malformed request: {reason}; send an HTTP/1.1 "
                                                                          "request (GET /v1/model or POST /v1/predict)"}
    assert server.snapshot()["turned_away"]["malformed"] == 2
    assert call(server, "GET", "/v1/model")[0] == 200


def test_a_content_length_in_non_ascii_digits_is_answered_411(store, server):
    """'²' (latin-1 0xB2) is a digit to str.isdigit() but not to int(): answered 411, as any length
    that is not ASCII digits, not a traceback and a dropped connection."""
    status, answer = raw_request(server, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xb2\r\n\r\n{}")
    assert status == 411 and "Content-Length" in answer["error"]
    assert call(server, "GET", "/v1/model")[0] == 200


def test_a_content_length_of_thousands_of_digits_is_answered_413(store, server, capfd):
    """5000 ASCII digits passed the check, then int() refused them (over 4300 digits): the request's thread died
    with a traceback on the agent's stderr, the client got no answer and nothing was counted."""
    request = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}"
    status, answer = raw_request(server, request)
    assert status == 413 and answer["error"] == ("malformed request: a body of 10**19 bytes or more is over the "
                                                 "22528-byte limit (the served model's 64 input numbers as JSON, 96 "
                                                 "bytes each and 16384 to spare); check the inputs' names and shapes "
                                                 "(GET /v1/model)")
    assert server.snapshot()["turned_away"]["malformed"] == 1 and "Traceback" not in capfd.readouterr().err
    assert call(server, "GET", "/v1/model")[0] == 200


def test_a_thousand_malformed_http_requests_leave_the_server_up_and_correct(store, server):
    rng = np.random.default_rng(3)
    bodies = [lambda: rng.bytes(int(rng.integers(1, 200))), lambda: b'{"inputs": {"image": [Infinity]}}',
              lambda: b'{"inputs": {"image": [[1], [2, 3]]}}', lambda: json.dumps({"inputs": {"image": [1.0] * 5}}).encode()]
    conn = http.client.HTTPConnection(*server.http_address, timeout=10)
    statuses = set()
    for i in range(1000):
        conn.request("POST", "/v1/predict", body=bodies[i % len(bodies)]())
        answer = conn.getresponse()
        statuses.add(answer.status)
        assert json.loads(answer.read())["ok"] is False
    conn.close()
    assert statuses == {400}
    x = samples(1)[0]
    with Client(store.root) as client:
        expected = client.predict({"image": x})["output_0"]
    status, answer = call(server, "POST", "/v1/predict", {"inputs": {"image": x.tolist()}})
    np.testing.assert_array_equal(np.array(answer["outputs"]["output_0"], np.float32), expected)


def test_http_connections_have_places_of_their_own_apart_from_the_socket_clients(wait, store, server):
    """Any local user can open TCP connections to 127.0.0.1; the socket is the agent's group's. Four
    HTTP connections in the middle of a request (serve.http_max_clients, default 4) leave the socket's
    places free, a fifth is told busy naming http_max_clients (none of the four is idle), and socket
    clients holding all theirs (each in the middle of a frame) leave HTTP answering.
    Before, HTTP and the socket shared max_clients: four idle TCP connections made a socket client busy."""
    assert server.http_max_clients == 4
    idle = [socket.create_connection(server.http_address, timeout=10) for _ in range(4)]
    for s in idle:
        s.sendall(b"GET /v1/mo")  # a request under way (its headers have 5 s)
    try:
        assert wait(lambda: server.snapshot()["http_clients"] == 4)
        with Client(store.root) as client:
            assert client.predict(samples(1)[0])["output_0"].shape == (10,)
        status, answer = call(server, "GET", "/v1/model")
        assert status == 503 and answer["error"] == ("busy: 4 HTTP clients connected (serve.http_max_clients); "
                                                     "retry later")
        away = server.snapshot()["turned_away"]
        assert away["busy_http"] == 1 and away["busy"] == 1  # busy: socket and HTTP; busy_http: the HTTP ones
    finally:
        for s in idle:
            s.close()
    assert wait(lambda: server.snapshot()["http_clients"] == 0)
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    for s in held:
        s.connect(str(store.root / "serve.sock"))
        s.sendall(b"EKS1")  # a frame under way
    try:
        assert wait(lambda: server.snapshot()["clients"] == 4)
        assert call(server, "GET", "/v1/model")[0] == 200
        with pytest.raises(ServingError, match=r"busy: 4 clients connected \(serve.max_clients\)"):
            Client(store.root).predict(samples(1)[0])
        assert server.snapshot()["turned_away"] == {"busy": 2, "malformed": 0, "busy_http": 1, "timed_out": 0,
                                                    "evicted_idle": 0}
    finally:
        for s in held:
            s.close()


def test_http_follows_a_hot_swap_and_feeds_the_shadow_run(wait, store, server):
    x = samples(3)
    server.serve_model(store.model_path(store.shas["fp32"]), store.shas["fp32"], "fp32")
    status, answer = call(server, "POST", "/v1/predict", {"inputs": {"image": x[0].tolist()}})
    assert status == 200 and answer["model"]["variant"] == "fp32"
    server.set_shadow(store.model_path(store.shas["int8"]), store.shas["int8"], "int8", share=1.0, max_per_s=1000,
                      max_load=1e9)
    for i, s in enumerate(x):  # paced: the shadow child takes each before the next comes
        assert call(server, "POST", "/v1/predict", {"inputs": {"image": s.tolist()}})[0] == 200
        wait(lambda: server.snapshot()["shadow"]["compared"] >= i + 1, timeout=20)  # asserted below, all 3
    shadow = server.snapshot()["shadow"]
    assert shadow["compared"] == 3 and shadow["errors"] == 0, shadow
    from device_agents.inference import ModelRunner, fidelity

    fp32 = ModelRunner(make(store.model_path(store.shas["fp32"]))).predict(x)
    int8 = ModelRunner(make(store.model_path(store.shas["int8"]))).predict(x)
    assert shadow["fidelity"]["snr_db"] == pytest.approx(fidelity(fp32, int8)["snr_db"])  # the same inputs ran there
    server.set_shadow(None)
    with pytest.raises(ServingError, match="shape"):  # and the socket says the same as HTTP
        Client(store.root).predict({"image": np.zeros((8, 8), np.float32)})


def test_a_taken_port_is_one_line(store, server):
    with pytest.raises(Exception, match=r"cannot listen on http://127.0.0.1:\d+"):
        Server(store.root / "other.sock", make_interpreter=make, http_port=server.http_address[1]).start()


def _free_port() -> int:
    """Return a loopback TCP port free now (for an agent's serve.http_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_agent_wires_http_port_and_runs_its_shadow_in_a_child(wait, store, tmp_path):
    """serve.http_port from agent.yaml reaches the agent's server; its shadow command starts a child
    process with the agent's own interpreter settings (a picklable factory)."""
    from device_agents.service import Agent
    from edgekit_protocol.commands import Command

    port = _free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {store.root}\nserve: {{http_port: {port}}}\n")
    agent = Agent(load_agent_config(cfg))
    agent.server.start()
    try:
        agent.follow_current()
        assert agent.server.http_address == ("127.0.0.1", port)
        assert call(agent.server, "GET", "/v1/model")[1]["model"]["variant"] == "int8"
        result = agent._cmd_shadow(Command("m1", "shadow", {"variant": "fp32", "share": 1.0}))
        assert result == {"shadow": {"sha256": store.shas["fp32"], "variant": "fp32"},
                          "serving": {"sha256": store.shas["int8"], "variant": "int8"}}
        for s in samples(3):
            assert call(agent.server, "POST", "/v1/predict", {"inputs": {"image": s.tolist()}})[0] == 200

        def offered() -> int:  # compared, or skipped: this shared machine's load average may be high
            s = agent.server.snapshot()["shadow"]
            return s["compared"] + s["skipped_busy_cpu"] + s["skipped_rate"]

        # the child runs under SCHED_IDLE: on a machine whose cores are all busy (CI's other worker converting a
        # model) it waits for an idle one; 10 s was once too short there
        assert wait(lambda: offered() >= 3, 120), agent.server.snapshot()["shadow"]
        shadow = agent.server.snapshot()["shadow"]
        assert shadow["runs_in"].startswith("child process") and shadow["errors"] == 0, shadow
        assert agent._cmd_shadow(Command("m2", "shadow", {"off": True})) == {"shadow": None}
    finally:
        agent.server.close()
        agent.spool.close()


def test_while_the_agent_loads_the_active_model_requests_are_told_so_not_to_deploy_one(store, tmp_path):
    """At the agent's start its socket is up seconds before the active model passed its check in a child:
    requests were answered "no model is active on this device; deploy one", an application's developer told
    to deploy a model that is there. Now the answer says it is loading (socket and HTTP alike), then serves."""
    from device_agents.service import Agent

    port = _free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {store.root}\nserve: {{http_port: {port}, socket: {tmp_path / 's.sock'}}}\n")
    agent = Agent(load_agent_config(cfg))
    agent.server.start()
    loads, seen = agent._loads_in_child, []

    def slow_check(*args):  # what an application sees while the child checks the model
        with Client(path=agent.server.path) as client:
            with pytest.raises(ServingError) as err:
                client.predict(samples(1)[0])
            seen.append(str(err.value))
        seen.append(call(agent.server, "GET", "/v1/model"))
        return loads(*args)

    agent._loads_in_child = slow_check
    try:
        agent.follow_current()
        want = f"the agent is loading the active model {store.shas['int8'][:12]} (checked in a child first); retry in a moment"
        assert seen == [want, (503, {"ok": False, "error": want})]
        assert call(agent.server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})[0] == 200
    finally:
        agent.server.close()
        agent.spool.close()


def test_the_agent_publishes_live_figures_and_new_shadow_comparisons_on_their_own_topics_signed(wait, store, tmp_path):
    """Each telemetry beat spools, beside telemetry (which no longer carries them), the served model's figures
    on ``live`` and, when a shadow run has new counts, its comparison on ``shadow``: each signed by the device,
    numbered per kind, and what every receiver accepts on that topic; an unchanged comparison is not sent again."""
    from device_agents.identity import Keyring, receive
    from device_agents.service import Agent
    from edgekit_protocol import messages
    from edgekit_protocol.commands import Command

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {store.root}\n")
    agent = Agent(load_agent_config(cfg))
    agent.server.start()
    keyring = Keyring({"pi-1": agent.signer.public})

    def beat() -> dict[str, list[dict]]:
        """Spool one beat; return what it spooled by kind, each checked as a receiver does on its topic."""
        after = max((r[0] for r in agent.spool.pending()), default=0)
        agent.telemetry()
        out: dict[str, list[dict]] = {}
        for _, topic, payload in agent.spool.pending(after=after):
            kind, msg = receive(keyring, topic, payload, time.time())
            out.setdefault(kind, []).append(msg)
        return out

    try:
        assert set(beat()) == {"telemetry"}  # nothing served yet: no live figures
        agent.follow_current()
        with Client(store.root) as app:
            for s in samples(3):
                app.predict({"image": s})
            agent._cmd_shadow(Command("m1", "shadow", {"variant": "fp32", "share": 1.0}))
            for s in samples(3):
                app.predict({"image": s})

        def offered() -> int:  # compared, skipped or dropped: on this shared machine the child may be busy or behind
            s = agent.server.snapshot()["shadow"]
            return s["compared"] + s["skipped_busy_cpu"] + s["skipped_rate"] + s["dropped_queue_full"] + s["errors"]

        assert wait(lambda: offered() >= 3), agent.server.snapshot()["shadow"]
        first = beat()
        assert sorted(first) == ["live", "shadow", "telemetry"] and "live" not in first["telemetry"][0]
        (live,), (shadow,) = first["live"], first["shadow"]
        assert live["model"] == {"sha256": store.shas["int8"], "variant": "int8"} and live["requests"] == 6
        assert live["latency_ms"]["p50"] > 0 and "shadow" not in live and "perf_counter_ns" in live["clock"]
        assert shadow["model"]["variant"] == "fp32" and shadow["serving"] == live["model"] and shadow["key_id"] == agent.signer.key_id
        again = beat()
        assert sorted(again) == ["live", "telemetry"]  # the same comparison: not sent twice
        assert (first["telemetry"][0]["seq"], live["seq"], shadow["seq"]) == (2, 1, 1)  # one count per kind
        assert again["live"][0]["seq"] == 2
        assert messages.topic("f", "pi-1", "shadow") in {r[1] for r in agent.spool.pending()}
    finally:
        agent.server.close()
        agent.spool.close()


def test_the_new_serve_limits_are_read_from_agent_yaml_and_checked(store, tmp_path):
    from device_agents.service import Agent

    cfg = tmp_path / "a.yaml"
    cfg.write_text("device: pi-1\nfleet: f\n")
    s = load_agent_config(cfg).serve
    assert (s.http_max_clients, s.http_max_body_mb, s.request_timeout_s, s.http_header_timeout_s,
            s.send_timeout_s) == (4, 4.0, 30.0, 5.0, 30.0)  # 4 MB: a 224x224x3 float input's JSON
    cfg.write_text(f"device: pi-1\nfleet: f\nroot: {store.root}\nserve: {{http_max_clients: 2, http_max_body_mb: 1.5, "
                   "request_timeout_s: 5, http_header_timeout_s: 2.5, send_timeout_s: 7, busy_poll_us: 300}\n")
    agent = Agent(load_agent_config(cfg))
    try:
        srv = agent.server
        assert (srv.http_max_clients, srv.http_max_body, srv.request_timeout_s, srv.http_header_timeout_s,
                srv.send_timeout_s, srv.busy_poll_ns) == (2, 1_500_000, 5, 2.5, 7, 300_000)
    finally:
        agent.spool.close()
    for bad, message in [("http_max_clients: 0", "http_max_clients 0 is not at least 1"),
                         ("http_max_body_mb: 0", r"serve: http_max_body_mb 0\.0 is not above 0"),
                         ("request_timeout_s: 0", r"request_timeout_s 0\.0 is not between 0 and 3600 seconds"),
                         ("http_header_timeout_s: -1", r"http_header_timeout_s -1\.0 is not between 0 and 3600 seconds"),
                         ("send_timeout_s: 7200", r"send_timeout_s 7200\.0 is not between 0 and 3600 seconds"),
                         ("busy_poll_us: -1", r"busy_poll_us -1 is not between 0 and 100000 microseconds"),
                         # each key named with its line and value (the five were lumped: "serve.max_clients (1-10000),
                         # serve.workers (1-64) and serve.max_payload_mb (0-4096) are out of range", no line, no value)
                         ("max_clients: 20000", r"a.yaml:4: serve: max_clients 20000 is over 10000, the most it takes$"),
                         ("workers: 65", r"a.yaml:4: serve: workers 65 is over 64, the most it takes$"),
                         ("max_payload_mb: 5000", r"a.yaml:4: serve: max_payload_mb 5000.0 is over 4096, the most it takes$"),
                         ("http_max_clients: 1001", r"a.yaml:4: serve: http_max_clients 1001 is over 1000, the most it takes$"),
                         ("http_max_body_mb: 4097", r"a.yaml:4: serve: http_max_body_mb 4097.0 is over 4096, the most it takes$")]:
        cfg.write_text(f"device: pi-1\nfleet: f\n\nserve: {{{bad}}}\n")
        with pytest.raises(ConfigError, match=message):
            load_agent_config(cfg)


def test_a_body_over_http_max_body_mb_is_refused_before_it_is_read(store, tmp_path):
    """JSON costs 4-34x its size while parsed: HTTP bodies have their own, smaller limit under the
    socket's max_payload_mb (64 MB), http_max_body_mb (here 1 MB, as on a device short of memory); over
    it, 413 before the body is read (the client has sent only the headers), naming the key and pointing
    at the socket's binary frames, and counted. A body under it is read and answered."""
    srv = Server(store.root / "big.sock", make_interpreter=make, max_payload=64 << 20, http_port=0,
                 http_max_body=1_000_000).start()
    try:
        for length in (4_000_000, 1_000_001):
            with socket.create_connection(srv.http_address, timeout=10) as raw:
                raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % length)
                got = b""
                while chunk := raw.recv(65536):  # answered and closed with no body sent
                    got += chunk
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413")
            assert json.loads(body)["error"] == (
                f"malformed request: a body of {length} bytes is over the 1000000-byte limit (serve.http_max_body_mb); "
                "send large inputs over the Unix socket (binary frames: device_agents.serving.Client)")
        assert srv.snapshot()["turned_away"]["malformed"] == 2
        body = b'{"inputs": {"image": [' + b",".join([b"1.5"] * 249_990) + b"]}}"
        assert 999_000 < len(body) <= 1_000_000
        status, answer = call(srv, "POST", "/v1/predict", body)
        assert status == 503 and answer["error"].startswith("no model is active")  # read and parsed: no model served
    finally:
        srv.close()
    cfg = tmp_path / "a.yaml"
    cfg.write_text("device: pi-1\nfleet: f\nserve: {http_max_body_mb: 0}\n")
    with pytest.raises(ConfigError, match=r"a.yaml.*http_max_body_mb 0\.0 is not above 0"):
        load_agent_config(cfg)


def test_outputs_json_cannot_carry_are_counted_as_an_error_not_an_answer(store, server):
    """The fp32 digits model answers NaN for inputs of 3e38 (its sums overflow). Over HTTP that is a
    500, and the live figures count an error, not an answered request (before: a success)."""
    server.serve_model(store.model_path(store.shas["fp32"]), store.shas["fp32"], "fp32")
    before = server.snapshot()
    status, answer = call(server, "POST", "/v1/predict", {"inputs": {"image": np.full((8, 8, 1), 3e38).tolist()}})
    assert status == 500 and "outputs hold NaN or infinity" in answer["error"], answer
    assert answer["model"]["variant"] == "fp32"
    live = server.snapshot()
    assert live["requests"] == before["requests"] and live["errors"] == before["errors"] + 1
    assert call(server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})[0] == 200
    with Client(store.root) as client:  # the socket's frames carry NaN: an answer there
        assert np.isnan(client.predict({"image": np.full((8, 8, 1), 3e38, np.float32)})["output_0"]).all()
    assert server.snapshot()["errors"] == before["errors"] + 1


@pytest.fixture
def strict(store):
    srv = Server(store.root / "strict.sock", make_interpreter=make, max_payload=1 << 20, http_port=0,
                 request_timeout_s=1.0, send_timeout_s=1.0).start()
    srv.serve_model(store.model_path(store.shas["int8"]), store.shas["int8"], "int8")
    yield srv
    srv.close()


def _answer_then_closed(raw: socket.socket) -> tuple[int, dict | None]:
    """Return the status and JSON body of what the server sends before it closes ``raw`` (0, None: nothing)."""
    raw.settimeout(5)
    got = b""
    try:
        while chunk := raw.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    if not got:
        return 0, None
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_request_trickling_in_is_cut_off_after_request_timeout_s(wait, store, strict, where):
    """One byte every 0.3 s keeps each read short, but the request's line, headers and body must
    arrive within request_timeout_s of its first byte: cut off, counted, and its place given back.
    Before, the limit was per read (30 s): one byte every 20 s kept the place for ever."""
    body = json.dumps({"inputs": {"image": samples(1)[0].tolist()}}).encode()
    data = f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    at = 0 if where == "headers" else data.index(b"\r\n\r\n") + 4
    with socket.create_connection(strict.http_address, timeout=10) as raw:
        raw.sendall(data[:at])
        t0 = time.monotonic()
        for i in range(at, at + 15):
            try:
                raw.sendall(data[i:i + 1])
            except OSError:
                break
            time.sleep(0.3)
            if strict.snapshot()["turned_away"]["timed_out"]:
                break
        assert time.monotonic() - t0 < 3.0
        status, answer = _answer_then_closed(raw)
    assert status == 408 and answer["error"] == ("timed out: a request must arrive within 1 s of its first byte "
                                                 "(serve.request_timeout_s)")
    assert wait(lambda: strict.snapshot()["turned_away"]["timed_out"] == 1 and strict.snapshot()["http_clients"] == 0)
    assert call(strict, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})[0] == 200


def test_an_idle_keep_alive_connection_is_closed_after_request_timeout_s_and_not_counted(wait, store, strict):
    conn = http.client.HTTPConnection(*strict.http_address, timeout=10)
    conn.request("GET", "/v1/model")
    assert conn.getresponse().read() and strict.snapshot()["http_clients"] == 1
    assert wait(lambda: strict.snapshot()["http_clients"] == 0, timeout=3)
    assert strict.snapshot()["turned_away"]["timed_out"] == 0
    conn.close()


RSS_CHILD = r"""
import sys, threading
from pathlib import Path
from device_agents.serving.server import Interpreters, Server
srv = Server(Path(sys.argv[1]), make_interpreter=Interpreters(), max_payload=64 << 20, http_max_body=4_000_000,
             http_port=0).start()
print(srv.http_address[1], flush=True)
for line in sys.stdin:
    status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    print(int(status["VmHWM"].split()[0]) // 1024, flush=True)
"""


def test_peak_memory_of_json_bodies_is_bounded_by_one_parse_at_a_time(wait, tmp_path):
    """In a child process serving HTTP with http_max_body_mb at 4, four clients post a ~4 MB JSON body
    each at once (under http_max_body_mb; no model is served, so no model's inputs bound the body
    further: each is parsed, then answered 503). JSON costs ~10x its size while parsed; one body is parsed
    at a time, so the peak (VmHWM) grows by about one parse plus the bodies held, not four parses.
    Before: bodies up to max_payload_mb (64 MB), all parsed at once; a 48 MB body alone took ~550 MB."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", RSS_CHILD, str(tmp_path / "rss.sock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())

        def peak_mb() -> int:
            child.stdin.write("\n")
            child.stdin.flush()
            return int(child.stdout.readline())

        rng = np.random.default_rng(5)
        body = json.dumps({"inputs": {"image": rng.uniform(0, 16, 380_000).round(6).tolist()}}).encode()
        assert 3_500_000 < len(body) < 4_000_000

        start = peak_mb()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/predict", body=body)
        assert conn.getresponse().status == 503  # no model, found after the parse
        conn.close()
        base = peak_mb()
        one = base - start  # what one parse costs at its peak
        request = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                   "Connection: close\r\n\r\n").encode() + body
        clients = []
        for _ in range(4):  # all but the last byte: the four bodies complete at the same moment; each connects as it
            # sends (one connected first waited for its first byte while the others sent: on a loaded machine, past
            # the server's limit for that, which closed it: a broken pipe here)
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=60))
            clients[-1].sendall(request[:-1])
        time.sleep(0.5)
        for c in clients:
            c.sendall(request[-1:])
        statuses = []
        for c in clients:
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
            statuses.append(int(answer.split()[1]))
            c.close()
        grew = peak_mb() - base
        assert statuses == [503] * 4
        print(f"one body: peak +{one} MB; then four at once: +{grew} MB more")
        assert one > 20 and grew < 40, (one, grew)
    finally:
        child.kill()
        child.wait()


def test_json_integers_past_64_bits_are_numbers_as_any_other():
    """An integer JSON number past 64 bits (JavaScript's JSON.stringify(1e20) writes 100000000000000000000) was
    refused as "null, objects or integers beyond 64 bits": numpy keeps such integers as Python objects. It is a
    number: read as a float, as the input always was; an input name holding "true" changes nothing."""
    body = json.dumps({"inputs": {"true": [[10**20, 1], [2.5, -3]]}}).encode()
    got = parse_inputs(body, 1 << 20)["true"]
    assert got.dtype == np.float32 and got.tolist() == np.float32([[1e20, 1.0], [2.5, -3.0]]).tolist()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_slowloris_is_cut_off_by_the_header_deadline_or_the_body_rate_not_request_timeout_s(wait, store, server, where):
    """A byte of the request line and headers every 0.25 s, or a body at 4 bytes/s, under the default
    limits: each read is quick, and before, the place was held for request_timeout_s (30 s) per
    request: four such clients locked HTTP out. Now the line and headers must be in within
    http_header_timeout_s (5 s) of the first byte and a body must keep coming at 64 kB/s after as long:
    cut off at ~5 s, answered 408 naming the setting, counted as timed_out; others are answered meanwhile."""
    assert server.request_timeout_s == 30.0  # and http_header_timeout_s its default, 5
    body = json.dumps({"inputs": {"image": samples(1)[0].tolist()}}).encode()
    data = f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    at = 0 if where == "headers" else data.index(b"\r\n\r\n") + 4
    with socket.create_connection(server.http_address, timeout=10) as raw:
        raw.sendall(data[:at])
        t0 = time.monotonic()
        for i in range(at, len(data)):
            if time.monotonic() - t0 > 9:
                break
            try:
                raw.sendall(data[i:i + 1])
            except OSError:
                break
            if i == at + 4:
                assert call(server, "GET", "/v1/model")[0] == 200  # everyone else is served meanwhile
            time.sleep(0.25)
            if server.snapshot()["turned_away"]["timed_out"]:
                break
        took = time.monotonic() - t0
        status, answer = _answer_then_closed(raw)
    assert 4.5 < took < 8.0, took
    assert status == 408, (status, answer)
    assert answer["error"] == ("timed out: a request's line and headers must arrive within 5 s of its first byte "
                               "(serve.http_header_timeout_s)" if where == "headers" else
                               "timed out: the body came slower than 65536 bytes/s after its first 5 s "
                               "(serve.http_header_timeout_s); send it at once")
    assert wait(lambda: server.snapshot()["turned_away"]["timed_out"] == 1 and server.snapshot()["http_clients"] == 0)
    assert call(server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})[0] == 200


def test_when_all_http_places_are_taken_the_longest_idle_keep_alive_connection_is_closed(wait, store, server, caplog):
    """Four idle connections (a keep-alive one that was answered, three that sent nothing) held every
    HTTP place for request_timeout_s, and a fifth client was told busy. Now the one idle the longest
    is closed for the new one (counted as evicted_idle, logged); one with a request under way is
    never closed, even when it came first; only when none is idle is a client told busy."""
    from device_agents.serving.server import EVICT_GRACE_S

    caplog.set_level("INFO", logger="edgekit.agent.serve")
    first = socket.create_connection(server.http_address, timeout=10)
    first.sendall(b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # under way: its headers are not all in
    assert wait(lambda: server.snapshot()["http_clients"] == 1)
    keep = http.client.HTTPConnection(*server.http_address, timeout=10)
    keep.request("GET", "/v1/model")
    assert keep.getresponse().read()  # answered, then idle: the longest idle once the others come
    others = []
    for i in range(2):
        time.sleep(0.05)
        others.append(socket.create_connection(server.http_address, timeout=10))
    try:
        assert wait(lambda: server.snapshot()["http_clients"] == 4)
        time.sleep(EVICT_GRACE_S + 1.0)  # the answered one has waited out its grace: the longest idle
        status, answer = call(server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})
        assert status == 200, answer
        live = server.snapshot()
        assert live["turned_away"]["evicted_idle"] == 1 and live["turned_away"]["busy_http"] == 0
        assert "closed the HTTP connection idle for" in caplog.text and "serve.http_max_clients" in caplog.text
        assert keep.sock.recv(64) == b""  # the keep-alive connection was closed
        first.sendall(b"\r\n")  # the request under way completes: answered
        status, answer = _answer_then_closed_after_one(first)
        assert status == 200 and answer["ok"] is True
        for s in others + [first]:  # now every place has a request under way: busy
            s.sendall(b"GET /v1/mo")
        assert wait(lambda: server.snapshot()["http_clients"] == 3)  # the call's connection left
        extra = socket.create_connection(server.http_address, timeout=10)
        extra.sendall(b"GET /v1/mo")
        assert wait(lambda: server.snapshot()["http_clients"] == 4)
        status, answer = call(server, "GET", "/v1/model")
        assert status == 503 and "serve.http_max_clients" in answer["error"]
        assert server.snapshot()["turned_away"]["evicted_idle"] == 1
        extra.close()
    finally:
        keep.close()
        for s in others + [first]:
            s.close()
    assert wait(lambda: server.snapshot()["http_clients"] == 0)


def _answer_then_closed_after_one(raw: socket.socket) -> tuple[int, dict]:
    """Return the status and JSON body of one answer on a kept-alive ``raw`` (read by its Content-Length)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += raw.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += raw.recv(65536)
    return int(head.split()[1]), json.loads(body)


def test_a_body_larger_than_the_models_inputs_can_need_is_refused_before_it_is_read(store, server):
    """The digits model takes 64 numbers: no body of more than 64 x 96 + 16384 bytes can fit it,
    whatever the settings allow (here 65536, max_payload_mb), yet such a body was read and parsed
    (a 4 MB body of nested lists or keys cost ~100 MB to parse). Now it is refused with 413 before
    it is read (the client sent only its headers), naming the limit, counted; a pretty-printed body
    with the batch axis still fits, and the server keeps answering."""
    with socket.create_connection(server.http_address, timeout=10) as raw:
        raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000\r\n\r\n")
        status, answer = _answer_then_closed(raw)
    assert status == 413 and answer["error"] == (
        "malformed request: a body of 30000 bytes is over the 22528-byte limit (the served model's 64 input "
        "numbers as JSON, 96 bytes each and 16384 to spare); check the inputs' names and shapes (GET /v1/model)")
    assert server.snapshot()["turned_away"]["malformed"] == 1
    from device_agents.serving.http import json_body_limit

    assert json_body_limit(server.current.input_shapes) == (64 * 96 + 16_384, 64)
    x = np.random.default_rng(2).uniform(-1e-300, 1e-300, (1, 8, 8, 1))  # the longest numbers, indented
    pretty = json.dumps({"inputs": {"image": x.tolist()}}, indent=4).encode()
    assert len(pretty) < 22528
    status, answer = call(server, "POST", "/v1/predict", pretty)
    assert status == 200 and answer["ok"] is True


def worst_bodies(size: int) -> dict[str, bytes]:
    """Return /v1/predict bodies of about ``size`` bytes that cost the most memory to parse per byte."""
    pre, post = b'{"inputs": {"image": [', b"]}}"
    n = size - len(pre) - len(post)
    keys = b",".join(b'"%x":0' % i for i in range(n // 7))[:n]
    return {"empty lists": pre + (b"[]," * (n // 3))[:-1] + post,
            "one-number lists": pre + (b"[0]," * (n // 4))[:-1] + post,
            "floats": pre + (b"1.5," * (n // 4))[:-1] + post,
            "many keys": b'{"inputs": {' + keys[:keys.rfind(b",")] + b"}}"}


def test_the_worst_json_bodies_the_served_model_allows_parse_in_under_a_megabyte():
    """What docs/serving.md quotes: tracemalloc's peak while parse_inputs reads the worst bodies
    (32-34 bytes of Python objects per byte of [[],[],...] or [[0],[0],...]) of the largest size the
    digits model allows, 22,528 bytes: under 1 MB each, where 4 MB bodies (http_max_body_mb, the
    only bound before) took 44-136 MB. A body of many keys is parsed in time linear in its size
    (the check for true/false scanned the whole body once per key: minutes for 4 MB)."""
    import tracemalloc

    from device_agents.serving.http import json_body_limit

    limit, _ = json_body_limit([("image", (8, 8, 1))])
    peaks = {}
    for kind, body in worst_bodies(limit).items():
        assert limit - 32 < len(body) <= limit
        tracemalloc.start()
        try:
            parse_inputs(body, 64 << 20)
        except ValueError:  # _BadRequest: none of them fits the model
            pass
        peaks[kind] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    print({k: f"{v:.2f} MB" for k, v in peaks.items()})
    assert max(peaks.values()) < 1.0, peaks
    t0 = time.process_time()
    parse_inputs(worst_bodies(1_000_000)["many keys"], 64 << 20)  # ~140,000 inputs named "0", "1", ...
    assert time.process_time() - t0 < 10, time.process_time() - t0


def test_keep_alive_clients_busy_with_requests_are_not_closed_between_two_of_them(wait, store, server):
    """Eviction took any connection waiting for its next request: a client sending requests back to back waits
    between its answer and its next request (a fraction of a millisecond), and a new client arriving then closed
    it, so its next request failed without an answer instead of the newcomer being told busy. A connection that
    had a request is now closed for a new client only once it has waited EVICT_GRACE_S; one that never sent a
    byte still gives its place at once (it cannot lock the others out by connecting again and again)."""
    import threading

    stop, errors, answered = threading.Event(), [], [0]

    def busy():
        conn = http.client.HTTPConnection(*server.http_address, timeout=10)
        try:
            while not stop.is_set():
                conn.request("GET", "/v1/model")
                assert conn.getresponse().read()
                answered[0] += 1
        except Exception as exc:  # noqa: BLE001 - what the busy client saw
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=busy) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait(lambda: answered[0] >= 40)
        statuses = [call(server, "GET", "/v1/model")[0] for _ in range(100)]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == [], errors
    assert set(statuses) <= {200, 503}, statuses  # the newcomer: told busy when every place is busy
    assert server.snapshot()["turned_away"]["evicted_idle"] == 0
    silent = [socket.create_connection(server.http_address, timeout=10) for _ in range(4)]  # never sent a byte
    try:
        assert wait(lambda: server.snapshot()["http_clients"] == 4)
        assert call(server, "GET", "/v1/model")[0] == 200  # one of them gave its place at once
        assert server.snapshot()["turned_away"]["evicted_idle"] == 1
    finally:
        for s in silent:
            s.close()


def test_a_keep_alive_connection_with_its_next_request_line_in_is_never_evicted(wait, store, server):
    """A client that pipelines: its answered request and the line of its next one came in one write, then it
    stalls past EVICT_GRACE_S (its headers not all in). The line sat in the server's read buffer, so the
    connection counted as idle and was closed for a new client. Now it keeps its place: with every other place
    under way too, the new client is told busy (503, counted), and the pipelined request is answered once its
    headers complete."""
    from device_agents.serving.server import EVICT_GRACE_S

    piped = socket.create_connection(server.http_address, timeout=10)
    piped.sendall(b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/model HTTP/1.1\r\n")
    assert _answer_then_closed_after_one(piped)[0] == 200
    others = [socket.create_connection(server.http_address, timeout=10) for _ in range(3)]
    try:
        for s in others:
            s.sendall(b"GET /v1/mo")  # under way
        assert wait(lambda: server.snapshot()["http_clients"] == 4)
        time.sleep(EVICT_GRACE_S + 0.3)
        status, answer = call(server, "GET", "/v1/model")
        assert status == 503 and "serve.http_max_clients" in answer["error"]
        live = server.snapshot()
        assert live["turned_away"]["evicted_idle"] == 0 and live["turned_away"]["busy_http"] == 1
        piped.sendall(b"Host: 127.0.0.1\r\n\r\n")
        status, answer = _answer_then_closed_after_one(piped)
        assert status == 200 and answer["ok"] is True
    finally:
        for s in [piped, *others]:
            s.close()


def test_a_connection_closed_before_its_first_request_is_answered_503_busy(wait, store, server):
    """Four connections that sent nothing hold every HTTP place; a fifth client takes the place of the one idle
    the longest, which was closed without an answer. It now gets the 503 a turned-away client gets (naming
    serve.http_max_clients), then the connection is closed."""
    silent = []
    for i in range(4):
        silent.append(socket.create_connection(server.http_address, timeout=10))
        assert wait(lambda: server.snapshot()["http_clients"] == i + 1)
        time.sleep(0.02)
    try:
        assert call(server, "GET", "/v1/model")[0] == 200
        status, answer = _answer_then_closed(silent[0])
        assert status == 503 and answer == {"ok": False, "error": "busy: 4 HTTP clients connected "
                                                                  "(serve.http_max_clients); retry later"}
        assert server.snapshot()["turned_away"]["evicted_idle"] == 1
    finally:
        for s in silent:
            s.close()


def test_the_worst_json_bodies_http_max_body_mb_allows_parse_in_under_40_megabytes():
    """What docs/serving.md quotes for http_max_body_mb at 1 MB (a model with large inputs is bounded by
    it alone): tracemalloc's peak while parse_inputs reads the worst bodies of 1 MB is 11-34 MB (the
    default 4 MB, which a 224x224x3 float input needs, takes 44-136 MB)."""
    import tracemalloc

    size = 1_000_000
    peaks = {}
    for kind, body in worst_bodies(size).items():
        tracemalloc.start()
        try:
            parse_inputs(body, 64 << 20)
        except ValueError:  # _BadRequest (many keys: not numbers of one input)
            pass
        peaks[kind] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    print({k: f"{v:.1f} MB" for k, v in peaks.items()})
    assert 10 < min(peaks.values()) and max(peaks.values()) < 40, peaks


def test_an_http_connection_whose_first_request_comes_as_it_is_evicted_gets_its_answer_and_no_503(
        wait, store, request_as_evicted):
    """The socket API's eviction race over HTTP: a connection with no request yet, chosen for a new
    client's place as its first request came, was answered 200 and then sent an unasked 503, which a
    keep-alive client would read as its next request's answer. Now it is closed after its answer."""
    srv = Server(store.root / "one.sock", make_interpreter=make, http_port=0, http_max_clients=1).start()
    srv.serve_model(store.model_path(store.shas["int8"]), store.shas["int8"], "int8")
    first = socket.create_connection(srv.http_address, timeout=10)
    try:
        assert wait(lambda: srv.snapshot()["http_clients"] == 1)
        request_as_evicted(lambda: first.sendall(b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        status, answer = call(srv, "GET", "/v1/model")  # the new client: answered
        assert status == 200 and answer["ok"] is True
        assert srv.snapshot()["turned_away"]["evicted_idle"] == 1
        status, answer = _answer_then_closed_after_one(first)  # the first one's request: answered
        assert status == 200 and answer["ok"] is True
        assert first.recv(64) == b""  # then closed, with no 503 after it
    finally:
        first.close()
        srv.close()


def test_get_live_answers_the_live_figures_as_the_socket_live_op_does(wait, store, server):
    """The live figures were the socket's alone (`live` op, `edgekit-agent state`): an application in another language
    on the loopback HTTP API had no way to read them."""
    for s in samples(3):
        assert call(server, "POST", "/v1/predict", {"inputs": {"image": s.tolist()}})[0] == 200
    assert call(server, "POST", "/v1/predict", {"inputs": {"image": [1.0]}})[0] == 400  # counted as an error
    # a closed connection holds its place until its thread reads the close (a CI run asked before that)
    assert wait(lambda: server.snapshot()["http_clients"] == 0)
    with Client(store.root) as client:  # one socket client connected meanwhile
        client.info()
        status, live = call(server, "GET", "/v1/live")
        over_socket = client.live()
    assert status == 200 and live["ok"] is True and live["source"] == "live"
    assert set(live) == {"ok", *over_socket}, set(live) ^ set(over_socket)
    assert live["model"] == over_socket["model"] == {"sha256": store.shas["int8"], "variant": "int8"}
    assert (live["requests"], live["errors"], live["window"]) == (3, 1, 3) == (
        over_socket["requests"], over_socket["errors"], over_socket["window"])
    assert live["clients"] == 1 and live["http_clients"] == 0  # the socket client; the asking connection not counted
    assert 0 < live["latency_ms"]["p50"] <= live["latency_ms"]["p99"] and live["measured_in"] == os.getpid()
    assert call(server, "POST", "/v1/live", b"{}")[0] == 405
    assert "GET /v1/live" in call(server, "GET", "/v1/nope")[1]["error"]
    idle = Server(store.root / "idle.sock", make_interpreter=make, http_port=0).start()  # nothing served: no figures
    try:
        status, live = call(idle, "GET", "/v1/live")
    finally:
        idle.close()
    assert status == 200 and live["model"] is None and live["clients"] == 0 and "requests" not in live
