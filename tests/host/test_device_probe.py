"""The deploy's one probe of a device (edge_kit.fleet.ssh.probe_argv), run by this machine's Python on a
device root laid out as a deploy leaves it: it writes its JSON itself, so what it prints must parse
whatever the names and contents hold."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from device_agents import codecheck
from edge_kit.fleet.ssh import probe_argv


def probe(root, verify=()) -> dict:
    out = subprocess.run(probe_argv(sys.executable, str(root), verify), capture_output=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_the_probe_reports_a_root_as_it_is_whatever_its_names_and_contents_hold(tmp_path):
    root = tmp_path / "root"
    code = root / "agent-0123456789ab-1"
    (code / "device_agents").mkdir(parents=True)
    (code / "device_agents" / "a.py").write_bytes(b"print('\\u00e9')\n")
    weird = os.fsencode(code / "device_agents") + b"/caf\xe9-\x01\"\\.py"  # not UTF-8, a control char, a quote
    with open(weird, "wb") as f:
        f.write(b"x")
    (code / codecheck.MANIFEST).write_text('{"sig": "s\\\\", "note": "\u00e9\U0001F600\t"}')
    (root / "agent").symlink_to(code.name)
    sha = "a" * 64
    (root / "models" / sha).mkdir(parents=True)
    (root / "models" / sha / "meta.json").write_text(json.dumps({"sha256": sha, "variant": "\u00e9\U0001F600"}, ensure_ascii=False))
    (root / "models" / ("b" * 64)).mkdir()  # no meta.json: null
    (root / "current").symlink_to(f"models/{sha}")
    (root / "agent.yaml").write_bytes(b"device: x\n")
    (root / "agent.pid").write_text(f"{os.getpid()}\n")
    found = probe(root)
    assert found["root"] == str(root) and found["current"] == sha
    assert found["code"]["files"] == codecheck.tree(root / "agent")  # the lone surrogate survives the trip
    assert found["code"]["manifest"] == (code / codecheck.MANIFEST).read_text()
    assert found["models"] == {sha: (root / "models" / sha / "meta.json").read_text(), "b" * 64: None}
    assert found["digests"]["config_sha256"] == hashlib.sha256(b"device: x\n").hexdigest()
    assert found["digests"]["password_sha256"] is None and found["device_pub"] is None
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:  # read back byte for byte (the host checks it)
        assert found["pid"] == str(os.getpid()) and found["cmdline"].encode("latin-1") == f.read()
    assert found["has_device_key"] is False and found["restart_pending"] is False


def test_an_empty_root_is_reported_as_nothing_installed(tmp_path):
    found = probe(tmp_path / "nothing-here")
    assert found["code"] == {"files": None, "manifest": None} and found["models"] == {} and found["current"] is None
    assert found["pid"] is None and found["cmdline"] is None


def test_the_probe_hashes_the_files_of_the_stored_models_it_is_asked_to_verify(tmp_path):
    from device_agents.store import damage

    data = b"\x00tflite bytes"
    sha = hashlib.sha256(data).hexdigest()
    folder = tmp_path / "models" / sha
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(data)
    (folder / "eval.npz").write_bytes(b"eval")
    other = tmp_path / "models" / ("c" * 64)
    other.mkdir()
    (other / "model.tflite").write_bytes(b"x")
    found = probe(tmp_path, (sha, "d" * 64))  # a model not there is left out; one not asked for is not hashed
    assert found["hashes"] == {sha: {"model.tflite": sha, "eval.npz": hashlib.sha256(b"eval").hexdigest()}}
    meta = {"sha256": sha, "eval_sha256": hashlib.sha256(b"eval").hexdigest()}
    assert damage(meta, sha, found["hashes"][sha]) is None
    (folder / "model.tflite").write_bytes(data + b"!")
    assert damage(meta, sha, probe(tmp_path, (sha,))["hashes"][sha]) == "the artifact no longer hashes to its sha256"


def _shell_printing(text):
    """A DeviceShell (not connected) whose commands print ``text``: what a device's own Python may print instead."""
    import types

    from edge_kit.fleet.ssh import DeviceShell

    shell = DeviceShell.__new__(DeviceShell)
    shell.dev = types.SimpleNamespace(name="pi-1", python="python3", root="~/edgekit", user="root", simulated=False)
    shell.verify = ("a" * 64,)
    shell.run = lambda argv, **_: text
    return shell


def _good(tmp_path) -> dict:
    return probe(tmp_path / "empty")


@pytest.mark.parametrize("change", [
    lambda d: [d],
    lambda d: {**d, "root": 1},
    lambda d: {**d, "models": ["a" * 64]},
    lambda d: {**d, "models": {"a" * 64: {"sha256": "a" * 64}}},
    lambda d: {**d, "hashes": {"a" * 64: ["x"]}},
    lambda d: {**d, "digests": {"config_sha256": 5}},
    lambda d: {**d, "unit_active": "active"},
    lambda d: {**d, "pid": "\u00b2", "cmdline": "supervise"},  # a digit int() refuses
    lambda d: {**d, "pid": "1", "cmdline": "\u0100"},  # not bytes read as latin-1
    lambda d: {**d, "code": {"files": [], "manifest": None}},
    lambda d: {**d, "has_device_key": "yes"},
    lambda d: {**d, "root": "/" + "r" * 5000},  # longer than a path: quoted in errors, uploads go under it
])
def test_a_probe_document_of_another_shape_is_one_line_naming_the_device(tmp_path, change):
    from edge_kit.errors import DeployError

    with pytest.raises(DeployError, match=r"^pi-1: the device state probe printed .*, not what the probe prints"):
        _shell_printing(json.dumps(change(_good(tmp_path))))._probe()


def test_a_probe_output_nested_past_the_parser_is_refused_not_raised(tmp_path):
    from edge_kit.errors import DeployError

    with pytest.raises(DeployError, match="unexpected output"):
        _shell_printing("[" * 100_000)._probe()
    deep = {**_good(tmp_path), "models": {"a" * 64: "[" * 60_000}, "hashes": {"a" * 64: {}}}  # within the size bound
    found = _shell_printing(json.dumps(deep))._probe()  # an unreadable meta.json: not installed, damaged
    assert found["installed"] == [] and found["damaged"] == {"a" * 64: "meta.json is missing or unreadable"}


@pytest.mark.parametrize("meta, why", [
    ('{"sha256": "%s", "variant": "int8", "model": "m", "bytes": NaN}' % ("a" * 64),
     "meta.json holds the non-finite number NaN"),
    ('{"sha256": "%s", "variant": "%s", "model": "m"}' % ("a" * 64, "v" * 513), "is not a name of 1-512"),
])
def test_a_meta_json_the_agent_takes_as_damaged_is_damaged_for_the_deploy_too(tmp_path, meta, why):
    """The deploy read the device's meta.json with Python's json (NaN taken) and no check of its fields: a model the
    agent reports as damaged counted as installed and intact, so the deploy never uploaded it again."""
    found = _shell_printing(json.dumps({**_good(tmp_path), "models": {"a" * 64: meta},
                                        "hashes": {"a" * 64: {"model.tflite": "a" * 64}}}))._probe()
    assert found["installed"] == [] and why in found["damaged"]["a" * 64]


def test_a_stored_model_whose_meta_names_an_odd_format_is_judged_not_raised():
    from device_agents.store import damage

    assert damage({"format": ["onnx"]}, "a" * 64, {}) == "the artifact no longer hashes to its sha256"


def test_an_output_of_many_lines_that_start_a_document_is_refused_in_linear_time():
    """Each line starting with `{` was tried with a copy of the rest of the output: 2 MB of them took 20 s."""
    import time

    from edge_kit.errors import DeployError

    shell = _shell_printing("\n{" * 1_000_000)
    started = time.monotonic()
    with pytest.raises(DeployError, match="unexpected output"):
        shell.run_json(["python3"], "the device state probe")
    assert time.monotonic() - started < 5
    assert _shell_printing('Welcome!\n[not json\n{"a": [1]}\n').run_json(["python3"], "x") == {"a": [1]}


GOOD_FACTS = {"free": 10 ** 9, "python": "/usr/bin/python3", "missing": [], "runtimes": {"onnxruntime": False},
              "version": [3, 11, 2]}


@pytest.mark.parametrize("facts", [
    [GOOD_FACTS], {**GOOD_FACTS, "free": "lots"}, {**GOOD_FACTS, "free": True}, {**GOOD_FACTS, "free": -1},
    {**GOOD_FACTS, "free": 1.5}, {**GOOD_FACTS, "version": 3}, {**GOOD_FACTS, "version": ["3", "11"]},
    {**GOOD_FACTS, "missing": "numpy"}, {**GOOD_FACTS, "runtimes": ["onnxruntime"]},
    {k: v for k, v in GOOD_FACTS.items() if k != "python"}])
def test_what_the_devices_python_says_of_itself_is_checked_before_the_deploy_reads_it(facts):
    """The facts a deploy asks the device's Python for (free space, version, missing modules, runtimes) were read
    as printed: a string for ``free`` or an int for ``version`` raised TypeError in the deploy, reported as
    "unexpected TypeError ... please report it". A device printing another shape is one line naming it."""
    from edge_kit.errors import DeployError

    shell = _shell_printing(json.dumps(facts))
    shell.root = "/opt/edgekit"
    with pytest.raises(DeployError, match=r"^pi-1: the device's Python printed .*, not what the facts script prints"):
        shell.python_facts  # noqa: B018 - the property runs the script
    good = _shell_printing(json.dumps(GOOD_FACTS))
    good.root = "/opt/edgekit"
    assert good.python_facts == GOOD_FACTS


def test_an_agent_command_that_prints_no_object_is_one_line_naming_the_device():
    """`state`, `activate` and `rollback` over SSH print an object; a list from a hostile device raised
    AttributeError where the deploy read a field of it (after an activation that timed out, for one)."""
    from edge_kit.errors import DeployError

    shell = _shell_printing("[1, 2]")
    shell.root = "/opt/edgekit"
    with pytest.raises(DeployError, match=r"^pi-1: the agent's `state` printed a JSON list, not an object"):
        shell.agent("state")


@pytest.mark.parametrize("answer", [{}, {"disk": "full"}, {"disk": {"free_bytes": "1e9", "min_free_bytes": 0}},
                                    {"disk": {"free_bytes": 10 ** 9}}, {"disk": {"free_bytes": 10 ** 9, "min_free_bytes": [4]}},
                                    {"disk": {"free_bytes": 10 ** 400, "min_free_bytes": 0}}])
def test_a_state_answer_without_byte_counts_fails_that_device_in_one_line(answer):
    """Before uploading, a deploy asks the running agent how much it can take: an answer without ``disk``, or
    with text where byte counts go, raised KeyError or TypeError ("unexpected ... please report it")."""
    import types

    from edge_kit.errors import DeployError
    from edge_kit.fleet.deploy import _Deployer

    deployer = _Deployer.__new__(_Deployer)
    deployer.opts = types.SimpleNamespace(health_timeout=1.0)
    deployer.client = types.SimpleNamespace(request=lambda device, name, args, **_: {"result": answer})
    shell = _shell_printing("")
    with pytest.raises(DeployError, match=r"^pi-1: its agent's answer to 'state' holds no byte counts"):
        deployer._free(shell)
    deployer.client = types.SimpleNamespace(request=lambda device, name, args, **_: {
        "result": {"disk": {"free_bytes": 10 ** 9, "min_free_bytes": 4 << 20}}})
    assert deployer._free(shell) == 10 ** 9 - (4 << 20)


def test_what_an_activation_says_it_removed_is_counted_only_as_far_as_it_is_byte_counts():
    """The agent's ``removed`` list (models its store budget removed) was summed as given: a device answering
    ``removed: 5`` or models without ``bytes`` raised TypeError after a successful activation."""
    from edge_kit.fleet.deploy import removed_text

    assert removed_text({"removed": [{"bytes": 2_000_000}, {"bytes": 1_100_000}]}) == \
        "removed 2 old model(s), 3.1 MB, for the store budget"
    assert removed_text({}) is None and removed_text({"removed": 5}) is None and removed_text({"removed": []}) is None
    assert removed_text({"removed": [{"bytes": "x"}, "y", {"bytes": 10 ** 400}, {"bytes": 1_000_000}]}) == \
        "removed 4 old model(s), 1.0 MB, for the store budget"


def test_a_small_models_sizes_never_read_zero_mb():
    """A user's own 4 kB model: the deploy said "uploaded fp32 (0.0 MB)" for every variant, and a store budget
    that removed small models "0.0 MB"."""
    from edge_kit.fleet.deploy import removed_text, size_text

    assert [size_text(n) for n in (3_900, 99_999, 100_000, 756_531, 512, 0)] == \
        ["3.9 kB", "100.0 kB", "0.1 MB", "0.8 MB", "512 bytes", "0 bytes"]
    assert removed_text({"removed": [{"bytes": 3_008}]}) == "removed 1 old model(s), 3.0 kB, for the store budget"


def test_a_failing_commands_error_line_is_cut_whatever_the_device_prints():
    """A failing command's last line of stderr is the device's text: one line of 20 MB (under the output limit)
    became the whole DeployError, the deploy table's cell and a rollout's stored row. It is cut as a reported
    error is, saying how long it was."""
    from edge_kit.errors import DeployError
    from edgekit_protocol.desired import MAX_ERROR_CHARS

    shell = _shell_printing("")
    del shell.run  # the real run(), over a channel that prints one huge line to stderr and exits 1
    shell._exec = lambda command, timeout: (1, "", "INFO: starting\n" + "E" * 20_000_000 + "\n")
    with pytest.raises(DeployError) as caught:
        shell.run(["python3", "-c", "x"])
    said = str(caught.value)
    assert said.startswith("pi-1: EEE") and said.endswith("... (20,000,000 characters)")
    assert len(said) < MAX_ERROR_CHARS + 40


@pytest.mark.parametrize("facts", [{**GOOD_FACTS, "missing": ["numpy\x1b[2J" + "x" * 10_000]},
                                   {**GOOD_FACTS, "python": "/usr/bin/" + "p" * 10_000_000}])
def test_the_facts_quoted_in_a_deploys_error_are_what_the_script_can_print(facts):
    """The deploy quotes the device Python's path and missing modules in its error: a device answering a 10 MB
    path or made-up module names had them in the error line whole. ``missing`` holds only the modules the script
    looks for, ``python`` a path's length at most."""
    from edge_kit.errors import DeployError

    shell = _shell_printing(json.dumps(facts))
    shell.root = "/opt/edgekit"
    with pytest.raises(DeployError, match=r"^pi-1: the device's Python printed ") as caught:
        shell.python_facts  # noqa: B018 - the property runs the script
    assert len(str(caught.value)) < 400


def test_the_facts_script_prints_what_the_deploy_takes():
    """The facts script, run by this machine's Python, prints a document of the shape the deploy checks."""
    import subprocess

    from edge_kit.fleet.ssh import _PYTHON_FACTS, _facts_shape

    out = subprocess.run([sys.executable, "-c", _PYTHON_FACTS, "/nonexistent/root"], capture_output=True, timeout=60,
                         check=True).stdout
    facts = json.loads(out)
    _facts_shape(facts)
    # which interpreter a profile's runtime.engine needs, and whether the Edge TPU's delegate loads, are said too
    import importlib.util

    assert facts["runtimes"]["litert"] is (importlib.util.find_spec("ai_edge_litert") is not None)
    assert facts["runtimes"]["tflite-runtime"] is (importlib.util.find_spec("tflite_runtime") is not None)
    import ctypes

    try:
        ctypes.CDLL("libedgetpu.so.1")
        loads = True
    except OSError:
        loads = False
    assert facts["runtimes"]["edgetpu"] is loads


@pytest.mark.parametrize("content, why", [
    # a byte that is not UTF-8 inside a string: decoded with "replace" on the device, it looked intact to the deploy
    (lambda sha: b'{"sha256": "%s", "variant": "int8", "model": "m\xff"}' % sha.encode(), "meta.json is missing or unreadable"),
    # 5 MB: it was printed whole (over the 4 MiB the host parses: the probe failed, so the deploy could not repair it)
    (lambda sha: b'{"sha256": "%s", "pad": "%s"}' % (sha.encode(), b"\xff" * 5_000_000),
     "meta.json: over the 65,536 bytes such a file may take"),
])
def test_the_deploy_and_the_agent_judge_a_stored_meta_json_alike_from_its_bytes(tmp_path, content, why):
    """The probe ran on a device root, its output read by the host: the model the agent's store calls damaged is
    damaged for the deploy too (so the deploy uploads it again), for the same reason; the probe prints at most the
    bytes the check needs."""
    from device_agents.store import ModelStore

    data = b"tflite bytes"
    sha = hashlib.sha256(data).hexdigest()
    folder = tmp_path / "models" / sha
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(data)
    (folder / "meta.json").write_bytes(content(sha))
    assert ModelStore(tmp_path).describe(sha) == {"sha256": sha, "damaged": why}  # the agent's own judgement
    out = subprocess.run(probe_argv(sys.executable, str(tmp_path), (sha,)), capture_output=True, timeout=60,
                         check=True).stdout
    assert len(out) < 400_000  # bounded on the device: not the file whole
    shell = _shell_printing(out.decode())
    shell.verify = (sha,)
    found = shell._probe()
    assert found["installed"] == [] and found["damaged"] == {sha: why}


def test_a_meta_json_whose_bytes_are_all_utf8_reads_the_same_through_the_probe(tmp_path):
    """The bytes the host takes back are the file's: one in UTF-8 (accents, emoji) is intact for both sides."""
    data = b"tflite bytes"
    sha = hashlib.sha256(data).hexdigest()
    folder = tmp_path / "models" / sha
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(data)
    (folder / "meta.json").write_text(json.dumps({"sha256": sha, "variant": "int8", "model": "m", "format": "tflite",
                                                  "note": "caf\u00e9 \U0001F600"}, ensure_ascii=False), encoding="utf-8")
    out = subprocess.run(probe_argv(sys.executable, str(tmp_path), (sha,)), capture_output=True, timeout=60,
                         check=True).stdout
    shell = _shell_printing(out.decode())
    shell.verify = (sha,)
    found = shell._probe()
    assert found["damaged"] == {} and [m["note"] for m in found["installed"]] == ["caf\u00e9 \U0001F600"]


def _stored(root, data: bytes, meta: bytes) -> str:
    """Store a model holding ``data`` under ``root`` with ``meta`` as its meta.json; return its sha256."""
    sha = hashlib.sha256(data).hexdigest()
    folder = root / "models" / sha
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(data)
    (folder / "meta.json").write_bytes(meta)
    return sha


def test_fifty_oversized_meta_json_files_not_utf8_leave_the_probe_within_what_the_host_parses(tmp_path):
    """Each meta.json was printed as up to 64 KiB + 1 bytes, a byte that is not UTF-8 as a six-character escape:
    about ten such files put the probe's answer past the 4 MiB the host parses, so that device's deploy failed in one
    line and no deploy could repair it (the repair needs the probe). Such bytes are judged on the device by the
    agent's rule (meta_fault) and sent as its one line; the host takes it as the agent does."""
    from device_agents.store import ModelStore
    from edge_kit.fleet.ssh import MAX_JSON_BYTES

    shas = [_stored(tmp_path, b"model %d" % i, b"\xff" * (64 * 1024 + 100)) for i in range(50)]
    small = _stored(tmp_path, b"small", b'{"sha256": "x", "model": "\xff"}')  # within the limit, not UTF-8
    out = subprocess.run(probe_argv(sys.executable, str(tmp_path), (*shas[:3], small)), capture_output=True,
                         timeout=60, check=True).stdout
    assert len(out) < 64 * 1024, f"{len(out):,} bytes printed"
    shell = _shell_printing(out.decode())
    shell.verify = (*shas[:3], small)
    found = shell._probe()
    assert found["installed"] == []
    store = ModelStore(tmp_path)
    assert found["damaged"] == {sha: store.describe(sha)["damaged"] for sha in (*shas[:3], small)}
    assert found["damaged"][shas[0]] == "meta.json: over the 65,536 bytes such a file may take"
    assert found["damaged"][small] == "meta.json is missing or unreadable"
    assert MAX_JSON_BYTES > 4 * len(out)


def test_what_the_probe_prints_of_meta_json_files_is_bounded_as_a_whole_the_candidates_first(tmp_path, monkeypatch):
    """A meta.json within the limit and in UTF-8 is sent as text for the host to judge, escaped (a newline takes six
    characters): past the probe's budget for them, a candidate's is sent as not read (uploaded again, which replaces
    nothing that is intact) and the other models are left out (the deploy needs only the candidates'), so no count
    of them takes the probe past what the host parses."""
    from edge_kit.fleet import ssh

    monkeypatch.setattr(ssh, "META_BUDGET", 400_000)  # one of them fits
    ssh._probe_script.cache_clear()
    try:
        sha_of = {i: hashlib.sha256(b"m%d" % i).hexdigest() for i in range(12)}
        for i, sha in sha_of.items():  # valid UTF-8, 60 KB: printed as 360 KB
            _stored(tmp_path, b"m%d" % i, b'{"sha256": "%s", "variant": "int8", "model": "m"' % sha.encode()
                    + b"\n" * 60_000 + b"}")
        wanted = tuple(sorted(sha_of.values())[-2:])  # the candidates sort last: they still come first
        out = subprocess.run(probe_argv(sys.executable, str(tmp_path), wanted), capture_output=True, timeout=60,
                             check=True).stdout
    finally:
        ssh._probe_script.cache_clear()
    assert len(out) < 400_000 + 20_000, f"{len(out):,} bytes printed"
    shell = _shell_printing(out.decode())
    shell.verify = wanted
    found = shell._probe()
    not_read = "meta.json not read: the device's meta.json files take more than the probe's 400000 bytes"
    assert [m["sha256"] for m in found["installed"]] == [wanted[0]] and found["damaged"] == {wanted[1]: not_read}
    assert sorted(json.loads(out)["models"]) == sorted(wanted)


def test_a_pid_file_of_thousands_of_digits_names_no_running_agent(tmp_path):
    """The probe's ``pid`` was taken to int() whole when its command line looked like the supervisor's: 5,000 digits
    raised ValueError (int() refuses 4,300), "unexpected ValueError ... please report it" in a deploy, and a
    traceback out of a rollback, which catches only edge-kit's errors. It names no process: no agent runs."""
    supervisor = f"python\0-m\0device_agents\0supervise\0--pidfile\0{tmp_path}/agent.pid\0"
    shell = _shell_printing(json.dumps({**_good(tmp_path), "root": str(tmp_path), "pid": "1" * 5000,
                                        "cmdline": supervisor}))
    assert shell._probe()["agent_pid"] is None
    shell = _shell_printing(json.dumps({**_good(tmp_path), "root": str(tmp_path), "pid": "4242", "cmdline": supervisor}))
    assert shell._probe()["agent_pid"] == 4242


def test_a_fifo_or_a_link_to_a_device_where_the_probe_reads_a_file_is_reported_as_no_file(tmp_path):
    """The probe opened every file it reads as a file: a FIFO (at agent.yaml, a meta.json, in the agent's code) held
    it until the command's deadline, every deploy of that device failed after 300 s and none could replace the file;
    a link to /dev/zero (the device key's public half) was read until the device's memory ran out. Such a file is
    none to the probe (the code's listing names it), so the deploy writes over it."""
    data = b"tflite bytes"
    sha = hashlib.sha256(data).hexdigest()
    folder = tmp_path / "models" / sha
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(data)
    os.mkfifo(folder / "meta.json")
    os.mkfifo(tmp_path / "agent.yaml")
    (tmp_path / "identity").mkdir()
    (tmp_path / "identity" / "device.pub").symlink_to("/dev/zero")
    (tmp_path / "mqtt.pass").symlink_to("/dev/zero")
    code = tmp_path / "agent-0123456789ab-1"
    code.mkdir()
    (tmp_path / "agent").symlink_to(code.name)
    os.mkfifo(code / "fifo.py")
    (code / "a.py").write_bytes(b"x")
    out = subprocess.run(probe_argv(sys.executable, str(tmp_path), (sha,)), capture_output=True, timeout=20,
                         check=True).stdout
    found = json.loads(out)
    assert found["digests"]["config_sha256"] is None and found["digests"]["password_sha256"] is None
    assert found["device_pub"] is None and found["models"] == {sha: None}
    assert found["code"]["files"] == {"a.py": hashlib.sha256(b"x").hexdigest(), "fifo.py": "not a regular file"}
    shell = _shell_printing(out.decode())
    shell.verify = (sha,)
    assert shell._probe()["damaged"] == {sha: "meta.json is missing or unreadable"}


def test_the_code_listing_manifest_and_command_line_the_probe_prints_are_bounded(tmp_path, monkeypatch):
    """The agent's code listing and manifest were printed whole: a folder of 60,000 files (a pip install into it, a
    flood of cache files) or a manifest of 1 MiB of control characters (six escaped each) took the probe past what
    the host parses, so no deploy could install the code again. Each is bounded; past it, the listing is cut (and
    differs) and the manifest is none, which the deploy repairs."""
    from edge_kit.fleet import ssh

    code = tmp_path / "agent-0123456789ab-1"
    code.mkdir()
    (tmp_path / "agent").symlink_to(code.name)
    for i in range(3000):
        (code / f"f{i:05d}.py").write_bytes(b"")
    (code / codecheck.MANIFEST).write_bytes(b"\x01" * 200_000)
    monkeypatch.setattr(ssh, "CODE_BUDGET", 100_000, raising=False)
    ssh._probe_script.cache_clear()
    long = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "\x01" * 100_000])
    try:  # the pid file names a process of a long command line: read up to CMDLINE_BYTES
        (tmp_path / "agent.pid").write_text(f"{long.pid}\n")
        found = probe(tmp_path)
    finally:
        long.kill()
        long.wait()
        ssh._probe_script.cache_clear()
    files = found["code"]["files"]
    assert 1000 < len(files) < 1400 and files["... (the listing was cut at 100000 bytes)"] == "cut"
    assert found["code"]["manifest"] is None
    assert len(found["cmdline"]) == 8 * 4096  # CMDLINE_BYTES
    assert len(json.dumps(found)) < 2 * 100_000 + 6 * 8 * 4096 + 10_000


@pytest.mark.parametrize("field", ["models", "hashes"])
def test_a_probe_answer_naming_models_by_other_than_a_sha256_is_refused_before_each_is_judged(tmp_path, field):
    """The store's folders are named by sha256, and the probe lists only those: a device answering with 350,000
    made-up names of a few characters (within the 4 MiB the host parses) had each judged, 6 s of the host's CPU."""
    from edge_kit.errors import DeployError

    names = {str(i): ("" if field == "models" else {}) for i in range(350_000)}
    answer = json.dumps({**_good(tmp_path), field: names}, separators=(",", ":"))
    assert len(answer) < 4 << 20
    with pytest.raises(DeployError, match=r"^pi-1: the device state probe printed a field 'models' or 'hashes' "
                                          r"naming a model by other than a sha256, not what the probe prints"):
        _shell_printing(answer)._probe()


def test_the_probe_lists_only_the_stores_folders_named_by_a_sha256(tmp_path):
    (tmp_path / "models" / ("Z" * 64)).mkdir(parents=True)  # not the store's: an honest device's stray folder
    (tmp_path / "models" / ("a" * 64)).mkdir()
    assert probe(tmp_path)["models"] == {"a" * 64: None}


def test_a_link_leading_to_itself_where_the_probe_reads_a_file_is_no_file(tmp_path):
    """A symlink loop at agent.yaml or the device's public key made the probe exit with "cannot read ... (Too many
    levels of symbolic links)": every deploy of that device failed in that line, and none wrote over the link."""
    (tmp_path / "agent.yaml").symlink_to("agent.yaml")
    (tmp_path / "identity").mkdir()
    (tmp_path / "identity" / "device.pub").symlink_to("device.pub")
    found = probe(tmp_path)
    assert found["digests"]["config_sha256"] is None and found["device_pub"] is None
