"""The serving API's loopback HTTP/JSON endpoint: the same server, model, limits, errors and figures as the socket."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import pytest

from device_agents.config import load_agent_config
from device_agents.serving import Client, ServingError
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


def test_http_is_off_by_default_and_the_port_is_checked(store, tmp_path):
    srv = Server(store.root / "off.sock", make_interpreter=make).start()
    try:
        assert srv.http_address is None
    finally:
        srv.close()
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
    (json.dumps({"inputs": {"image": np.zeros((8, 8)).tolist()}}).encode(), 400,
     r"input 'image': shape \[8, 8\], the model takes \[8, 8, 1\]"),  # the socket API's text
    (json.dumps({"inputs": {"image": np.zeros((8, 8, 1)).tolist(), "other": [1]}}).encode(), 400,
     "unknown input 'other'"),
    (b"[" * 100_000 + b"]" * 100_000, 413, "over the 65536-byte limit"),  # refused before it is read
    (json.dumps({"inputs": {"image": np.zeros((60, 60, 3)).tolist()}}).encode(), 400, "shape"),
])
def test_bad_requests_get_the_reason_and_the_server_keeps_answering(store, server, body, status, message):
    got, answer = call(server, "POST", "/v1/predict", body)
    assert got == status and answer["ok"] is False, answer
    assert __import__("re").search(message, answer["error"]), answer["error"]
    ok, good = call(server, "POST", "/v1/predict", {"inputs": {"image": samples(1)[0].tolist()}})
    assert ok == 200 and len(good["outputs"]["output_0"]) == 10


def test_deep_nesting_missing_length_wrong_paths_and_methods(store, server):
    status, answer = call(server, "POST", "/v1/predict", b"[" * 30_000 + b"]" * 30_000)
    assert status == 400 and "malformed request" in answer["error"]
    assert call(server, "GET", "/v1/nope")[0] == 404
    assert call(server, "GET", "/v1/predict")[0] == 405
    assert call(server, "POST", "/v1/model", b"{}")[0] == 405
    with socket.create_connection(server.http_address, timeout=10) as raw:  # no Content-Length
        raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 411")
    with socket.create_connection(server.http_address, timeout=10) as raw:  # a client that goes away mid-body
        raw.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{\"inputs\"")
    deadline = time.monotonic() + 10
    while server.snapshot()["turned_away"]["malformed"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # the cut request is noticed by the server's thread, after the client left
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


def test_a_content_length_in_non_ascii_digits_is_answered_411(store, server):
    """'²' (latin-1 0xB2) is a digit to str.isdigit() but not to int(): answered 411, as any length
    that is not ASCII digits, not a traceback and a dropped connection."""
    status, answer = raw_request(server, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xb2\r\n\r\n{}")
    assert status == 411 and "Content-Length" in answer["error"]
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


def test_http_shares_max_clients_with_the_socket_and_is_told_busy(store, server):
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    for s in held:
        s.connect(str(store.root / "serve.sock"))
    time.sleep(0.2)
    try:
        status, answer = call(server, "GET", "/v1/model")
        assert status == 503 and "busy: 4 clients connected (serve.max_clients)" in answer["error"]
        assert server.snapshot()["turned_away"]["busy"] >= 1
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert call(server, "GET", "/v1/model")[0] == 200


def test_http_follows_a_hot_swap_and_feeds_the_shadow_run(store, server):
    x = samples(3)
    server.serve_model(store.model_path(store.shas["fp32"]), store.shas["fp32"], "fp32")
    status, answer = call(server, "POST", "/v1/predict", {"inputs": {"image": x[0].tolist()}})
    assert status == 200 and answer["model"]["variant"] == "fp32"
    server.set_shadow(store.model_path(store.shas["int8"]), store.shas["int8"], "int8", share=1.0, max_per_s=1000,
                      max_load=1e9)
    for i, s in enumerate(x):  # paced: the shadow child takes each before the next comes
        assert call(server, "POST", "/v1/predict", {"inputs": {"image": s.tolist()}})[0] == 200
        deadline = time.monotonic() + 20
        while server.snapshot()["shadow"]["compared"] < i + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
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


def test_the_agent_wires_http_port_and_runs_its_shadow_in_a_child(store, tmp_path):
    """serve.http_port from agent.yaml reaches the agent's server; its shadow command starts a child
    process with the agent's own interpreter settings (a picklable factory)."""
    from device_agents.service import Agent
    from edgekit_protocol.commands import Command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # compared, or skipped: this shared machine's load average may be high
            shadow = agent.server.snapshot()["shadow"]
            if shadow["compared"] + shadow["skipped_busy_cpu"] + shadow["skipped_rate"] >= 3:
                break
            time.sleep(0.05)
        assert shadow["runs_in"].startswith("child process") and shadow["errors"] == 0, shadow
        assert agent._cmd_shadow(Command("m2", "shadow", {"off": True})) == {"shadow": None}
    finally:
        agent.server.close()
        agent.spool.close()
