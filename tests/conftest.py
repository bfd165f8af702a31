"""Shared fixtures. Integration fixtures build real models with TensorFlow once per session."""

from __future__ import annotations

import os
import signal
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["COLUMNS"] = "200"  # rich tables printed by the CLI stay on one line per row

# A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and Python
# then keeps it ignored: the Ctrl-C tests (which send SIGINT to this process or to CLI children it starts) would
# test nothing. Ctrl-C is put back as a terminal gives it; xdist workers import this file too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The slowest files, slowest first (seconds of one worker, per-test reports of the README's whole run, 4 workers on
# 2 cores, quiet machine, 2026-12-01: the run took 17.0 minutes). They start first, so the other files fill the
# workers around them: xdist hands out whole files, by default those with the most tests first, and the slowest one
# (16 tests) started last and ran alone for minutes (the suite took 21.9 to 24.6 minutes by the order). With
# --no-loadscope-reorder (pyproject.toml addopts) xdist keeps this order. Refresh it when a file grows slow.
SLOWEST_FIRST = (
    "tests/integration/test_onnx_source.py",  # 217 s
    "tests/integration/test_deploy.py",  # 159 s
    "tests/integration/test_monitor.py",  # 142 s
    "tests/integration/test_compile_errors.py",  # 125 s
    "tests/host/test_onnx_control_flow.py",  # 104 s
    "tests/integration/test_loop.py",  # 75 s
    "tests/integration/test_agent_service.py",  # 73 s
    "tests/integration/test_pull_rollout.py",  # 69 s
    "tests/integration/test_compile.py",  # 65 s
    "tests/integration/test_history_share_scan.py",  # 59 s
    "tests/agent/test_serving_http.py",  # 50 s
    "tests/integration/test_real_models.py",  # 46 s
    "tests/integration/test_onnx_variants.py",  # 39 s
    "tests/integration/test_monitor_postgres.py",  # 37 s
    "tests/host/test_token_id_variants.py",  # 34 s
    "tests/host/test_cli_entry.py",  # 33 s
    "tests/agent/test_serving.py",  # 30 s
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the files of :data:`SLOWEST_FIRST` to the front, in its order; every other test keeps its place (a stable
    sort, after any plugin's reordering). Return nothing."""
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture
def unblocked():
    """Return ``run(call, fifo, timeout, what)``: ``call()`` in a thread; return the exception it raised (None if none).
    A call still running after ``timeout`` seconds is waiting in the open of the FIFO ``fifo`` (a plain open waits for
    a writer): a writer is opened to release it and the test fails naming ``what``."""
    import threading

    def run(call, fifo, timeout: float, what: str) -> BaseException | None:
        caught: list[BaseException] = []

        def guarded():
            try:
                call()
            except BaseException as exc:  # noqa: BLE001  (returned to the test)
                caught.append(exc)

        worker = threading.Thread(target=guarded, daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"{what} {fifo} (a FIFO) waited for a writer")
        return caught[0] if caught else None

    return run


@pytest.fixture(autouse=True)
def _python_recursion_limit_kept():
    """Put Python's recursion limit back after each test. onnx2tf sets it to 2**31-1 when imported (a test runs the
    conversion child's main() in-process): every later test in that worker then overflowed the C stack (a
    segmentation fault that ended the worker) where deep nesting raises RecursionError, which the code under test
    relies on."""
    limit = sys.getrecursionlimit()
    yield
    sys.setrecursionlimit(limit)


@pytest.fixture
def wait():
    """``wait(predicate, timeout=10.0)``: poll ``predicate`` every 20 ms; return whether it held in time."""
    import time

    def until(predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return False

    return until


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `edgekit ARGS...` in-process (a compile too: no worker process); return (exit code, stdout, stderr)."""
    from edge_kit.cli import main
    from edge_kit.cli.worker import WORKER_ENV

    monkeypatch.setenv(WORKER_ENV, "")

    def run(*args: str) -> tuple[int, str, str]:
        argv = sys.argv
        sys.argv = ["edgekit", *map(str, args)]
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = argv
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def run_on_a_terminal(code: str, **env: str) -> tuple[int, str]:
    """Run ``python -c code`` on a pseudo-terminal (with ``env`` over this process's environment); return its exit code
    and all it wrote there (stdout and stderr, as the terminal shows them)."""
    import pty
    import subprocess

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "xterm-256color", **env})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture
def on_a_terminal():
    """:func:`run_on_a_terminal`, for tests whose output is drawn only on a terminal (progress bars, colours)."""
    return run_on_a_terminal


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory):
    """The digits example (trained briefly) in a session temp folder."""
    from edge_kit.examples import digits

    return digits(tmp_path_factory.mktemp("digits"), epochs=10)


@pytest.fixture(scope="session")
def digits_artifacts(digits_files, tmp_path_factory):
    """fp32, dynamic-int8 and int8 builds of the digits model, with the shipped eval.npz."""
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.profiles import load_profile

    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "dynamic-int8", "int8"]})
    out = tmp_path_factory.mktemp("artifacts")
    compile_model(CompileRequest(digits_files.model, [profile], out, calib=digits_files.calib, eval=digits_files.eval))
    return out / "digits"


@pytest.fixture(scope="session")
def digits_artifacts_v2(tmp_path_factory):
    """A second, differently trained digits model: new sha256s to deploy over the first."""
    from edge_kit.compiler.pipeline import CompileRequest, compile_model
    from edge_kit.examples import digits
    from edge_kit.profiles import load_profile

    files = digits(tmp_path_factory.mktemp("digits-v2"), epochs=2, seed=1)
    profile = load_profile("rpi4").model_copy(update={"variants": ["fp32", "dynamic-int8", "int8"]})
    out = tmp_path_factory.mktemp("artifacts-v2")
    compile_model(CompileRequest(files.model, [profile], out, calib=files.calib, eval=files.eval))
    return out / "digits"


@pytest.fixture
def tune_offline(monkeypatch):
    """Run ``edge_kit.loop.tune`` with no broker: its fleet client reports no statuses and its sleeps are
    skipped (unit tests that fake the measuring and deploying around it); returns the tune module."""
    from edge_kit.loop import tune

    class Offline:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return None

        def statuses(self):
            return []

    monkeypatch.setattr(tune.FleetClient, "of", staticmethod(lambda _f: Offline()))
    monkeypatch.setattr(tune.time, "sleep", lambda _s: None)
    return tune


@pytest.fixture
def trickling_http():
    """Return the URL of a loopback HTTP server that answers every request with a status line and then
    one header that never ends, a byte every 0.2 s (a hostile or broken store or proxy); stopped after
    the test."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not stop.wait(0.2):
                    conn.sendall(b"a")
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


@pytest.fixture
def silent_port():
    """A loopback port that takes no connection and refuses none: a listener whose accept queue is full, so
    Linux drops each new SYN and a connect hangs until its timeout (as to a host that does not answer)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(16):
            try:
                probe = socket.create_connection(("127.0.0.1", port), timeout=0.3)
            except TimeoutError:
                break  # the queue is full: this connect hung
            fillers.append(probe)
        else:
            pytest.fail("could not fill the listener's accept queue")
        yield port
    finally:
        for s in fillers:
            s.close()
        server.close()
