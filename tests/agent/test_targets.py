"""Target plugins: the registry, Edge TPU / GPU rule checks on hand-built op tables, the
edgetpu_compiler runner, and device-side loading.

edgetpu_compiler cannot be installed here (Coral's apt repository is not reachable), so its runner is
exercised with a stand-in script that writes a model and prints the compiler's log format.
"""

import stat

import pytest

from device_agents.errors import RuntimeUnavailable
from device_agents.targets import TARGETS, compiler_of, get_target
from device_agents.targets.edgetpu import EdgeTpu, parse_compiler_log, run_compiler
from device_agents.targets.gpu import LiteRtGpu
from edge_kit.compiler.analysis import ModelStats, OpInfo, TensorInfo

edgetpu_rule_check = EdgeTpu.rule_check
gpu_rule_check = LiteRtGpu.rule_check


def tensor(i, shape, dtype="int8", constant=False, sig=None):
    return TensorInfo(i, f"t{i}", tuple(shape), tuple(sig or shape), dtype, dtype == "int8", constant)


def stats(ops, tensors):
    return ModelStats(bytes=0, gzip_bytes=0, precision="int8", ops=ops, tensors={t.index: t for t in tensors},
                      op_histogram={}, macs=0, macs_nonzero=0, weights=0, weights_nonzero=0)


def test_all_supported_ops_map():
    s = stats([OpInfo(0, "CONV_2D", [0, 1], [2]), OpInfo(1, "FULLY_CONNECTED", [2, 3], [4])],
              [tensor(0, [1, 8, 8, 1]), tensor(1, [16, 3, 3, 1], constant=True), tensor(2, [1, 8, 8, 16]),
               tensor(3, [10, 1024], constant=True), tensor(4, [1, 10])])
    r = edgetpu_rule_check(s)
    assert (r["ops_mapped"], r["first_fallback"]) == (2, None)


def test_first_unsupported_op_sends_everything_after_it_to_cpu():
    s = stats([OpInfo(0, "CONV_2D", [0, 1], [2]), OpInfo(1, "SIN", [2], [3]), OpInfo(2, "CONV_2D", [3, 1], [4])],
              [tensor(0, [1, 8, 8, 1]), tensor(1, [1, 3, 3, 1], constant=True), tensor(2, [1, 8, 8, 1]),
               tensor(3, [1, 8, 8, 1]), tensor(4, [1, 8, 8, 1])])
    r = edgetpu_rule_check(s)
    assert r["ops_mapped"] == 1
    assert r["first_fallback"] == {"index": 1, "op": "SIN", "reason": "SIN is not an Edge TPU op"}
    assert r["fallback_ops"] == {"SIN": 1, "CONV_2D": 1}


def test_more_than_three_dimensions_larger_than_one():
    s = stats([OpInfo(0, "ADD", [0, 0], [1])], [tensor(0, [2, 4, 4, 3]), tensor(1, [2, 4, 4, 3])])
    assert "more than 3 dimensions larger than 1" in edgetpu_rule_check(s)["first_fallback"]["reason"]


def test_float_and_dynamic_tensors_do_not_map():
    s = stats([OpInfo(0, "ADD", [0, 0], [1])], [tensor(0, [1, 4], "float32"), tensor(1, [1, 4], "float32")])
    assert "not 8-bit quantized" in edgetpu_rule_check(s)["first_fallback"]["reason"]
    s = stats([OpInfo(0, "ADD", [0, 0], [1])], [tensor(0, [1, 4], sig=[-1, 4]), tensor(1, [1, 4])])
    assert "dynamic shape" in edgetpu_rule_check(s)["first_fallback"]["reason"]


def test_gpu_check_lists_unsupported_ops_only():
    s = stats([OpInfo(0, "CONV_2D", [0], [1]), OpInfo(1, "CUMSUM", [1], [2])],
              [tensor(0, [1, 4], "float32"), tensor(1, [1, 4], "float32"), tensor(2, [1, 4], "float32")])
    r = gpu_rule_check(s)
    assert r["ops_mapped"] == 1 and r["unsupported_ops"] == {"CUMSUM": 1}


LOG = """\
Edge TPU Compiler version 16.0.384591198
Model compiled successfully in 12 ms.

Input model: model.tflite
Output model: model_edgetpu.tflite
On-chip memory used for caching model parameters: 200.00KiB
Number of Edge TPU subgraphs: 1
Total number of operations: 4
Operation log: model_edgetpu.log

Operator                       Count      Status

CONV_2D                        2          Mapped to Edge TPU
FULLY_CONNECTED                1          Mapped to Edge TPU
QUANTIZE                       1          Operation is otherwise supported, but not mapped due to some unspecified limitation
"""


def test_compiler_log_parsing():
    rows = parse_compiler_log(LOG)
    assert [(r["op"], r["count"], r["mapped"]) for r in rows] == [
        ("CONV_2D", 2, True), ("FULLY_CONNECTED", 1, True), ("QUANTIZE", 1, False)]


def fake_compiler(tmp_path, body):
    path = tmp_path / "edgetpu_compiler"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_runner_returns_the_compiled_model_and_mapping(tmp_path):
    (tmp_path / "log").write_text(LOG)
    script = fake_compiler(tmp_path, f"""
if [ "$1" = "--version" ]; then echo "Edge TPU Compiler version 16.0"; exit 0; fi
out="$3"; src="$4"
cat "$src" > "$out/model_edgetpu.tflite"; printf 'TPU' >> "$out/model_edgetpu.tflite"
cat {tmp_path / 'log'}
""")
    data, mapping = run_compiler(b"MODEL", script)
    assert data == b"MODELTPU"
    assert mapping["method"] == "edgetpu_compiler" and mapping["version"] == "Edge TPU Compiler version 16.0"
    assert sum(r["count"] for r in mapping["ops"] if r["mapped"]) == 3


def test_runner_reports_the_compilers_last_line_on_failure(tmp_path):
    script = fake_compiler(tmp_path, "echo 'ERROR: Attempting to use a delegate that only supports static-sized tensors' >&2; exit 1\n")
    with pytest.raises(RuntimeError, match="exit 1.*static-sized tensors"):
        run_compiler(b"MODEL", script)


def test_a_compiler_that_cannot_be_started_is_one_line_saying_what_to_install(tmp_path):
    """A missing compiler (gone from PATH after the check) or a file that is not executable: FileNotFoundError and
    PermissionError came out of the runner (a traceback from edgekit compile). One line now, naming the compiler,
    the path and what to install."""
    with pytest.raises(RuntimeError) as missing:
        run_compiler(b"MODEL", str(tmp_path / "gone" / "edgetpu_compiler"))
    assert str(missing.value) == (f"edgetpu_compiler could not be started (No such file or directory: {tmp_path}/gone/"
                                  "edgetpu_compiler); install Coral's edgetpu-compiler package (x86-64 Linux, "
                                  "docs/firmware/coral.md) so it is on PATH, and compile again")
    plain = tmp_path / "edgetpu_compiler"
    plain.write_text("not a program")
    with pytest.raises(RuntimeError, match=r"^edgetpu_compiler could not be started \(Permission denied: .*install "
                                           r"Coral's edgetpu-compiler package"):
        run_compiler(b"MODEL", str(plain))


def test_the_mapped_and_total_counts_come_from_the_summary_else_the_table():
    """The summary's "will run on Edge TPU" count and total where printed; else the table's sums; every op mapped when
    the log gives a total and does not say some ops run on the CPU."""
    from device_agents.targets.edgetpu import mapping_counts

    assert mapping_counts(LOG, parse_compiler_log(LOG)) == (3, 4)  # no "will run on Edge TPU" line: the table's
    summary = LOG + "Number of operations that will run on Edge TPU: 2\nNumber of operations that will run on CPU: 2\n"
    assert mapping_counts(summary, parse_compiler_log(LOG)) == (2, 4)
    assert mapping_counts("Total number of operations: 7\n", []) == (7, 7)
    partial = ("Total number of operations: 7\nModel successfully compiled but not all operations are supported by "
               "the Edge TPU.\n")
    assert mapping_counts(partial, []) == (None, 7) and mapping_counts("", []) == (None, None)


def test_the_registry_finds_each_target_by_its_key_and_names_the_closest_when_unknown():
    assert set(TARGETS) == {"xnnpack", "none", "edgetpu", "gpu"}
    assert all(get_target(key).key == key for key in TARGETS)
    assert compiler_of("edgetpu") is EdgeTpu and compiler_of("int8") is None
    with pytest.raises(RuntimeUnavailable, match="unknown target 'edgtpu'; did you mean 'edgetpu'"):
        get_target("edgtpu")


def test_the_edgetpu_plugin_compiles_with_the_compiler_on_path_and_says_what_to_install_without(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "edgetpu_compiler not found on PATH" in EdgeTpu.compiler_unavailable()
    assert EdgeTpu.tool_versions() == {"edgetpu_compiler": None}
    fake_compiler(tmp_path, """
if [ "$1" = "--version" ]; then echo "Edge TPU Compiler version 16.0"; exit 0; fi
cp "$4" "$3/model_edgetpu.tflite"
""")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert EdgeTpu.compiler_unavailable() is None
    assert EdgeTpu.compile(b"MODEL")[0] == b"MODEL"
    assert EdgeTpu.tool_versions() == {"edgetpu_compiler": "Edge TPU Compiler version 16.0"}


def test_a_target_whose_library_is_missing_is_refused_with_what_to_install():
    class Module:  # the interpreter module is never reached: the library probe fails first
        def load_delegate(self, lib):
            raise AssertionError("load_delegate must not be called when the library cannot load")

    with pytest.raises(RuntimeUnavailable, match="libedgetpu.so.1, which could not be loaded.*libedgetpu1-std"):
        EdgeTpu.interpreter_options(Module())
    assert get_target("xnnpack").interpreter_options(Module()) == {}


def test_a_targets_options_are_checked_by_its_own_model_and_reach_load_delegate(tmp_path, monkeypatch):
    from edgekit_protocol.errors import ConfigError

    assert EdgeTpu.options({"device": "usb:0"}).device == "usb:0"
    with pytest.raises(ConfigError, match="options.devic: unknown key; did you mean 'device'"):
        EdgeTpu.options({"devic": "usb"})
    with pytest.raises(ConfigError, match="options.precision: unknown key"):
        get_target("xnnpack").interpreter_options(object(), {"precision": "fp16"})

    seen = {}

    class Module:
        def load_delegate(self, lib, options):
            seen[lib] = options
            return "delegate"

    monkeypatch.setattr("ctypes.CDLL", lambda lib: None)  # the library "loads": what reaches load_delegate?
    assert EdgeTpu.interpreter_options(Module(), {"device": "pci:0"}) == {"experimental_delegates": ["delegate"]}
    assert seen == {"libedgetpu.so.1": {"device": "pci:0"}}
    EdgeTpu.interpreter_options(Module(), None)
    assert seen["libedgetpu.so.1"] == {}  # unset options are not passed


class _Delegate:
    """A fake Edge TPU delegate (takes a weak reference, as LiteRT's does)."""


def _probes(monkeypatch, opens=True):
    """Count the Edge TPU openings of :meth:`EdgeTpu.device_missing` (a fake ``load_delegate``: it opens, or no TPU
    answers, as LiteRT's own error); return the list each opening appends to."""
    calls = []

    def load(library, options):
        calls.append((library, options))
        if not opens:
            raise ValueError(f"Failed to load delegate from {library}\n")
        return _Delegate()

    monkeypatch.setattr("ctypes.CDLL", lambda lib: None)  # libedgetpu loads
    monkeypatch.setattr("device_agents.targets.edgetpu.load_delegate", load)
    return calls


def test_the_edge_tpu_is_not_opened_to_ask_while_this_process_serves_from_it(monkeypatch):
    """On a real Coral the status after each command opened the Edge TPU in the agent's process, also while the
    serving API's interpreter held it: an opening for nothing, on the USB device inference runs on. While an
    interpreter of this process holds the Edge TPU's delegate it is attached: nothing is opened to ask."""
    import gc

    from device_agents.targets import accelerator_missing

    calls = _probes(monkeypatch)

    class Module:
        def load_delegate(self, lib, options):
            return _Delegate()

    serving = EdgeTpu.interpreter_options(Module(), None)  # the serving API's interpreter holds this
    assert [accelerator_missing("edgetpu", "edgetpu") for _ in range(3)] == [None] * 3
    assert calls == []
    del serving
    gc.collect()
    assert accelerator_missing("edgetpu", "edgetpu") is None and len(calls) == 1  # served no more: asked


def test_an_edge_tpu_that_opened_is_not_opened_again_for_the_stated_time_one_missing_is_asked_each_time(monkeypatch):
    """A TPU that opened is taken as attached for PROBE_TTL_S (no opening at every status, bench and activation: one
    process at a time opens it, a smoke child opening it in that instant failed); none attached is asked for again at
    each check, so a stick plugged in is found at once."""
    from device_agents.targets import edgetpu

    calls = _probes(monkeypatch, opens=False)
    assert [EdgeTpu.device_missing() is not None for _ in range(2)] == [True, True] and len(calls) == 2
    calls = _probes(monkeypatch, opens=True)
    assert [EdgeTpu.device_missing() for _ in range(5)] == [None] * 5 and len(calls) == 1
    assert edgetpu.PROBE_TTL_S == 30.0  # the time docs/firmware/coral.md states
    monkeypatch.setattr(EdgeTpu, "_opened_until", {})  # PROBE_TTL_S later
    calls = _probes(monkeypatch, opens=False)
    assert EdgeTpu.device_missing().startswith("no Edge TPU attached") and len(calls) == 1


def _one_usb_accelerator_listed(tmp_path, monkeypatch):
    """Make the kernel's listing (sysfs USB devices, /dev) one Coral USB Accelerator and no PCIe card, in folders under
    ``tmp_path``; return those two folders."""
    from device_agents.targets import edgetpu

    usb, dev = tmp_path / "usb", tmp_path / "dev"
    (usb / "2-1").mkdir(parents=True)
    dev.mkdir()
    (usb / "2-1" / "idVendor").write_text("18d1\n")
    (usb / "2-1" / "idProduct").write_text("9302\n")
    monkeypatch.setattr(edgetpu, "SYSFS_USB", usb)
    monkeypatch.setattr(edgetpu, "DEV", dev)
    return usb, dev


def test_an_edge_tpu_the_kernel_lists_that_another_process_holds_is_busy_not_missing(tmp_path, monkeypatch):
    """A USB Accelerator a smoke, bench or shadow child (another process) holds does not open in the agent's: that
    was reported "no Edge TPU attached", and selection left the edgetpu variant out. The kernel's listing (sysfs
    USB ids, /dev/apex_N), read without opening anything, tells busy from none attached."""
    usb, dev = _one_usb_accelerator_listed(tmp_path, monkeypatch)
    _probes(monkeypatch, opens=False)
    assert EdgeTpu.device_missing() is None  # attached, held elsewhere: that process's own run says what fails
    (usb / "2-1" / "idProduct").write_text("0001\n")  # another device of that vendor: none attached
    assert EdgeTpu.device_missing().startswith("no Edge TPU attached")
    (dev / "apex_0").touch()  # the M.2/PCIe card's node
    assert EdgeTpu.device_missing() is None


def test_the_edge_tpu_probe_opens_the_one_runtime_options_device_names(tmp_path, monkeypatch):
    """With two Corals, or a USB one while the PCIe one is busy, the probe opened whichever libedgetpu opens first
    (runtime.options.device ignored): another TPU opening said the configured one was attached. The probe loads the
    delegate with the options the interpreter's is loaded with now, takes an opening (or a delegate this process
    holds) for that device only, and the kernel's listing counts that device's kind and index only."""
    import gc

    from device_agents.targets import accelerator_missing

    calls = _probes(monkeypatch)
    assert accelerator_missing("edgetpu", "edgetpu", {"device": "usb:0"}) is None
    assert calls == [("libedgetpu.so.1", {"device": "usb:0"})]
    assert EdgeTpu.device_missing({"device": "usb:0"}) is None and len(calls) == 1  # it opened: PROBE_TTL_S
    assert EdgeTpu.device_missing({"device": "pci:0"}) is None and calls[-1] == ("libedgetpu.so.1", {"device": "pci:0"})
    assert EdgeTpu.device_missing() is None and calls[-1] == ("libedgetpu.so.1", {}) and len(calls) == 3

    class Module:
        def load_delegate(self, lib, options):
            return _Delegate()

    EdgeTpu.forget()
    serving = EdgeTpu.interpreter_options(Module(), {"device": "usb:0"})  # the serving API holds usb:0
    assert EdgeTpu.device_missing({"device": "usb:0"}) is None and len(calls) == 3
    assert EdgeTpu.device_missing({"device": ":1"}) is None and calls[-1] == ("libedgetpu.so.1", {"device": ":1"})
    del serving
    gc.collect()

    _, dev = _one_usb_accelerator_listed(tmp_path, monkeypatch)
    EdgeTpu.forget()
    _probes(monkeypatch, opens=False)  # none opens: the kernel's listing tells busy from missing
    assert EdgeTpu.device_missing({"device": "usb:0"}) is None  # the USB one listed: busy
    for device in ("usb:1", "pci", "pci:0", ":1"):  # a second USB one, a PCIe one, a second of any: none listed
        assert EdgeTpu.device_missing({"device": device}).startswith(
            f"no Edge TPU attached as {device} (runtime.options.device): libedgetpu.so.1 loads"), device
    (dev / "apex_0").touch()
    assert [EdgeTpu.device_missing({"device": d}) for d in ("pci", "pci:0", ":1")] == [None] * 3
    assert EdgeTpu.device_missing({"device": "pci:1"}) is not None
    assert EdgeTpu.device_missing({"devic": "usb"}).endswith("options.devic: unknown key; did you mean 'device'?")


def test_an_edge_tpu_device_index_no_integer_holds_is_a_line_from_the_probe_never_a_traceback(tmp_path, monkeypatch):
    """agent.yaml's ``delegate_options: {device: "usb:²"}`` (a digit to ``str.isdigit``) or an index thousands of
    digits long: when the Edge TPU did not open, the kernel's listing raised ValueError from ``int()`` out of the probe
    (a traceback from `edgekit-agent activate`). An index int() cannot read names any of its kind, as another spelling
    does; one past a billion names none."""
    from device_agents.targets import edgetpu

    usb, dev = _one_usb_accelerator_listed(tmp_path, monkeypatch)
    _probes(monkeypatch, opens=False)
    for device in ("usb:²", "usb:٣", "usb:/sys/bus/usb/devices/2-1"):
        assert EdgeTpu.device_missing({"device": device}) is None, device  # the USB one listed: busy
        assert not edgetpu.enumerated(device.replace("usb", "pci"), usb, dev), device
    assert edgetpu.enumerated("usb:" + "0" * 5000, usb, dev)  # index 0, however written
    assert EdgeTpu.device_missing({"device": "usb:" + "9" * 5000}).startswith("no Edge TPU attached as usb:999")
    assert EdgeTpu.device_missing({"device": "usb:1000000000"}).startswith("no Edge TPU attached as usb:1000000000")


def test_the_edge_tpu_probe_names_the_device_option_on_one_line_escaped_and_short(tmp_path, monkeypatch):
    """The probe's "no Edge TPU attached as <device>" quoted agent.yaml's ``device`` as written: a newline or an
    escape sequence in it (a fleet file's override, a hand edit) split the one-line refusal or drove the terminal it
    was shown on, and a long one made the line as long. Shown escaped now, at most 40 characters and its length."""
    _one_usb_accelerator_listed(tmp_path, monkeypatch)
    _probes(monkeypatch, opens=False)
    said = EdgeTpu.device_missing({"device": "pci:0\n\x1b[2Jusb:0" + "0" * 100})
    assert said.startswith("no Edge TPU attached as pci:0\\x0a\\x1b[2Jusb:00000000000000000000... (121 characters) "
                           "(runtime.options.device): libedgetpu.so.1 loads"), said
    assert said.isprintable()


def test_an_interpreter_made_while_the_probe_looks_through_the_held_edge_tpus_waits_for_it(monkeypatch):
    """The probe looks through the delegates this process's interpreters hold for the device it asks about (it counted
    them before), under the probe's lock; the serving API remembered a new interpreter's delegate without it, so one
    made by another thread in that moment changed the mapping under the look: RuntimeError (dictionary changed size
    during iteration) out of the probe, where the agent's status asks. It waits for the probe now."""
    import threading
    import time
    import weakref

    _probes(monkeypatch)

    class Module:
        def load_delegate(self, lib, options):
            return _Delegate()

    made = []

    def serve():
        made.append(EdgeTpu.interpreter_options(Module(), {"device": "usb:1"}))

    class Held(weakref.WeakKeyDictionary):
        def values(self):  # another thread's interpreter made while the probe looks
            for value in super().values():
                worker = threading.Thread(target=serve)
                worker.start()
                worker.join(0.3)
                yield value

    monkeypatch.setattr(EdgeTpu, "_held", Held())
    serving = EdgeTpu.interpreter_options(Module(), {"device": "usb:0"})
    assert EdgeTpu.device_missing({"device": "pci:0"}) is None
    deadline = time.monotonic() + 5
    while not made and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(made) == 1 and sorted(EdgeTpu._held.data.values()) == ["usb:0", "usb:1"], serving


def test_a_process_waits_its_edge_tpu_turn_then_is_told_in_one_line_who_may_hold_it(tmp_path):
    """The running agent's check and load of its model and `edgekit-agent activate`'s smoke check take turns on the
    Edge TPU through ``<root>/edgetpu.lock`` (a flock: two opens of it exclude each other, in one process too: here
    another thread's). One that waited its ``wait_s`` in vain is told in one line what holds it; the turn ended, the
    next one takes it."""
    import threading
    import time

    from device_agents.errors import AcceleratorBusy
    from device_agents.targets.edgetpu import turn

    def other():
        with pytest.raises(AcceleratorBusy) as caught, turn(tmp_path, wait_s=0.3):
            pass
        told.append(caught)

    told: list = []
    with turn(tmp_path):
        t0 = time.monotonic()
        waiting = threading.Thread(target=other)
        waiting.start()
        waiting.join(10)
        assert 0.3 <= time.monotonic() - t0 < 5
    (caught,) = told
    assert str(caught.value) == (f"another process holds the Edge TPU for a model it checks or loads ({tmp_path}/"
                                 "edgetpu.lock taken for 0.3 s: the running agent, or edgekit-agent activate or "
                                 "bench); retry once it ends")
    with turn(tmp_path):  # let go
        pass


def test_a_turn_waited_for_ends_its_wait_when_the_agent_stops(tmp_path):
    """The agent's bench waits up to TURN_WAIT_S (180 s) for edgekit-agent activate's turn: stopping the agent meanwhile
    (systemd's stop, which kills after 90 s) waited all of it. Its stop event ends the wait at once, in one line."""
    import threading
    import time

    from device_agents.errors import AcceleratorBusy
    from device_agents.targets.edgetpu import turn

    stop, told = threading.Event(), []

    def bench():
        with pytest.raises(AcceleratorBusy) as caught, turn(tmp_path, wait_s=60, cancel=stop):
            pass
        told.append(caught)

    with turn(tmp_path):
        waiting = threading.Thread(target=bench)
        waiting.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        stop.set()
        waiting.join(10)
        assert time.monotonic() - t0 < 1
    (caught,) = told
    assert "no longer waited for: this agent is stopping" in str(caught.value) and "\n" not in str(caught.value)


def test_a_turn_nested_in_the_thread_holding_it_is_its_own_while_another_thread_waits_for_it(tmp_path):
    """The agent's check and load of its current model, and its bench, hold the Edge TPU turn around a smoke check that
    takes it too: a second open of ``<root>/edgetpu.lock`` is another flock, which waited for the first, so the agent
    found its own turn busy. A turn nested in the thread that holds it is just its block now; another thread of the
    process still waits for it (or is told it is busy), and takes it once the outer one ends, not the nested one."""
    import threading
    import time

    from device_agents.errors import AcceleratorBusy
    from device_agents.targets.edgetpu import turn

    took, busy = [], []

    def other(wait_s: float) -> None:
        try:
            with turn(tmp_path, wait_s):
                took.append(time.monotonic())
        except AcceleratorBusy as exc:
            busy.append(exc)

    waiting = threading.Thread(target=other, args=(30.0,))
    with turn(tmp_path):
        with turn(tmp_path, wait_s=0.3):  # nested: at once, never told busy
            with turn(tmp_path):
                told = threading.Thread(target=other, args=(0.0,))
                told.start()
                told.join(10)
                waiting.start()
                time.sleep(0.5)
        time.sleep(0.3)
        assert len(busy) == 1 and took == [] and waiting.is_alive()  # the nested ones let nothing go
        ended = time.monotonic()
    waiting.join(10)
    assert len(took) == 1 and took[0] >= ended and len(busy) == 1


def test_an_edge_tpu_turn_whose_file_does_not_open_is_one_line_naming_it(tmp_path):
    """``<root>/edgetpu.lock`` that does not open (a root this user may not write, a file another user made
    unreadable; here a link into a folder that is not there): a bare OSError came out, a traceback from `edgekit-agent
    activate` and the end of the running agent at its start-up check. It is a one-line DeviceError naming the file
    and what to do now; the block does not run."""
    from device_agents.errors import DeviceError
    from device_agents.targets.edgetpu import turn

    (tmp_path / "edgetpu.lock").symlink_to(tmp_path / "gone" / "edgetpu.lock")
    ran = []
    with pytest.raises(DeviceError) as caught, turn(tmp_path):
        ran.append(True)
    assert not ran
    assert str(caught.value) == (f"cannot take turns on the Edge TPU: {tmp_path}/edgetpu.lock does not open (No such "
                                 "file or directory); let the agent's user and the one running edgekit-agent activate "
                                 f"read it and create files in {tmp_path}")


def test_a_deploy_over_ssh_waits_for_activate_as_long_as_its_turn_pause_and_smoke_check_may_take():
    """activate may wait its Edge TPU turn (TURN_WAIT_S), then for serving's pause and its own smoke check: about
    330 s, where the host gave every agent command 300 s and reported the device failed while it still worked."""
    from device_agents.__main__ import PAUSE_ASK_TIMEOUT_S
    from device_agents.store import SMOKE_TIMEOUT_S
    from device_agents.targets.edgetpu import TURN_WAIT_S
    from edge_kit.fleet.deploy import ACTIVATE_TIMEOUT_S

    assert ACTIVATE_TIMEOUT_S > TURN_WAIT_S + PAUSE_ASK_TIMEOUT_S + SMOKE_TIMEOUT_S + 60  # a minute to start and load
