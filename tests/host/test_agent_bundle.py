"""The agent bundle a deploy ships: the agent and the protocol package, nothing of the host."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

from device_agents import codecheck
from edge_kit.fleet.agent_install import agent_bundle


def test_the_bundle_holds_the_agent_and_the_protocol_package_only_and_runs_without_the_host(tmp_path):
    data, sha, files = agent_bundle()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert {n.split("/")[0] for n in names} == {"device_agents", "edgekit_protocol"}
    assert "device_agents/service.py" in names and "edgekit_protocol/messages.py" in names
    assert agent_bundle() == (data, sha, files)  # reproducible: the same code gives the same sha256
    assert codecheck.tree(tmp_path) == files  # what the device's check lists once unpacked

    # Import every module of the unpacked bundle with the host package made unimportable.
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")
                     and not n.endswith("__main__.py"))
    code = ("import sys; sys.modules['edge_kit'] = None; sys.modules['tensorflow'] = None; "
            f"sys.path.insert(0, {str(tmp_path)!r}); import importlib; "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "import device_agents; print(device_agents.__file__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith(str(tmp_path))


def test_devices_deploying_at_once_build_the_bundle_once(monkeypatch):
    """A deploy's devices ask for the bundle at once, a thread each: one builds and gzips it, the others wait for it
    (each built it in a fresh `edgekit deploy --parallel 16`: 16 gzips of the same code, 85 ms of CPU each here)."""
    import gzip
    import threading
    import time

    from edge_kit.fleet import agent_install

    built, compress = [], gzip.compress

    def slow_compress(data, **kwargs):
        built.append(len(data))
        time.sleep(0.3)  # every thread asks meanwhile
        return compress(data, **kwargs)

    agent_install._build_bundle.cache_clear()
    monkeypatch.setattr(agent_install.gzip, "compress", slow_compress)
    results = []
    threads = [threading.Thread(target=lambda: results.append(agent_bundle())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    assert len(results) == 8 and all(r == results[0] for r in results)


def test_a_device_manifest_nested_past_the_parser_or_not_an_object_is_not_this_operators():
    import types

    from edge_kit.fleet.agent_install import _code_state

    _, _, files = agent_bundle()
    for manifest in ("[" * 100_000, "[1]"):
        shell = types.SimpleNamespace(info={"code": {"files": files, "manifest": manifest}})
        assert _code_state(shell, None) == "its signed manifest is missing or not this operator's"


def test_the_file_names_a_device_reports_are_cut_in_the_reason_a_deploy_quotes():
    """Why a deploy reinstalls the agent quotes the first differing files by the names the device's probe printed:
    a device reporting a file of a 1 MB name put it whole in the deploy's table cell and `--json`."""
    import types

    from edge_kit.fleet.agent_install import _code_state

    _, _, files = agent_bundle()
    shell = types.SimpleNamespace(info={"code": {"files": {**files, "x" * 1_000_000: "a" * 64}, "manifest": None}})
    why = _code_state(shell, None)
    assert why.startswith("code differs: added xxx") and why.endswith("... (1,000,006 characters)")
    assert len(why) < 300  # MAX_SHOWN_PATH (200) and the words around it
