"""The monitor judges a benchmark's accuracy bound (``min_accuracy_ratio``) against the device's fp32 accuracy: the
newest fp32 benchmark of that device and model, from the history when it starts (one query) and from what arrives.
Before, it judged every benchmark with no fp32 accuracy, so a variant losing accuracy was never alerted."""

from __future__ import annotations

import json
import time

import pytest
from monitor_helpers import fleet_yaml
from monitor_helpers import started as _started

from edge_kit.telemetry.store import Store
from edgekit_protocol import messages


@pytest.fixture
def fleet_file(tmp_path):
    return fleet_yaml(tmp_path / "fleet.yaml", ('d1', 'd2'))  # rpi4: min_accuracy_ratio 0.99, p90 <= 50 ms



def _bench(device, seq, variant, accuracy, model="digits", p90=20.0):
    return ("bench", messages.envelope("bench", "sim", device, seq, {
        "variant": variant, "sha256": variant[0] * 64, "model": model, "model_bytes": 200_000, "profile": "rpi4",
        "runs": 100, "simulated": True, "power": {"source": "not measured"},
        "latency_ms": {"p50": p90 / 2, "p90": p90, "p99": p90 * 1.2, "mean": p90 / 2, "std": 0.1, "min": 0.1,
                       "max": p90 * 2},
        "accuracy": None if accuracy is None else {"metric": "top1", "value": accuracy, "samples": 80}}))


def _kept(worker, *records):
    """Have ``worker`` store ``records`` as checked messages of one batch."""
    worker._keep(list(records), [json.dumps(m).encode() for _k, m in records], [time.time()] * len(records))


EXPECTED = ("d2 int8: breaks accuracy >= 0.99 x fp32 (51.25% on the eval set, 0.9535 x fp32's 53.75%, its newest "
            "fp32 benchmark on d2); a simulated device: this machine's figures")


def test_an_int8_losing_accuracy_against_the_fp32_the_history_holds_is_alerted(fleet_file, tmp_path, monkeypatch):
    """The user's case: fp32 scored 53.75 % on d2 (in the history), the monitor runs, int8 scores 51.25 % against
    min_accuracy_ratio 0.99: 0 alerts. Now one constraints alert with both figures and where the fp32 one came from;
    no history query per record."""
    store = Store(tmp_path / "h.db")
    store.add_many([_bench("d2", 1, "fp32", 0.4), _bench("d2", 2, "fp32", 0.5375), _bench("d2", 3, "fp32", 0.9, "other")])
    mon = _started(fleet_file, store)
    monkeypatch.setattr(store, "reference_accuracies", lambda *_a, **_k: pytest.fail("a query per record"))
    _kept(mon, _bench("d2", 4, "int8", 0.5125))
    assert [(a.kind, a.text) for a in mon.alerts] == [("constraints", EXPECTED)]
    assert [(r["device"], r["kind"], r["subject"]) for r in store.alerts(holds=True)] == [("d2", "constraints", "int8")]
    _kept(mon, _bench("d2", 5, "int8", 0.535))  # 0.995 x fp32: it meets the bound again, its episode ends
    assert store.alerts(holds=True) == [] and not mon.notes
    mon.stop()


def test_the_fp32_accuracy_follows_the_records_that_arrive(fleet_file, tmp_path):
    """An fp32 benchmark arriving while the monitor runs is what the next int8 is judged against (newest wins), per
    model: another model's fp32 judges nothing of this one."""
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, _bench("d2", 1, "fp32", 0.9), _bench("d2", 2, "fp32", 0.5375), _bench("d2", 3, "fp32", 0.99, "other"))
    _kept(mon, _bench("d2", 4, "int8", 0.5125), _bench("d1", 1, "int8", 0.5125))
    assert [a.text for a in mon.alerts] == [EXPECTED]
    mon.stop()




def test_a_bound_judged_against_onnx_fp32_names_it(fleet_file, tmp_path):
    """An ONNX model compiled without LiteRT variants is judged against its onnx-fp32 accuracy: the alert said
    'accuracy >= 0.99 x fp32 (..., 0.9535 x fp32's 53.75%, its newest onnx-fp32 benchmark on d2)', a ratio to a
    variant the model does not have. It names onnx-fp32."""
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, _bench("d2", 1, "onnx-fp32", 0.5375), _bench("d2", 2, "onnx-int8", 0.5125))
    assert [a.text for a in mon.alerts] == [
        "d2 onnx-int8: breaks accuracy >= 0.99 x onnx-fp32 (51.25% on the eval set, 0.9535 x onnx-fp32's 53.75%, its "
        "newest onnx-fp32 benchmark on d2); a simulated device: this machine's figures"]
    mon.stop()

def test_an_onnx_variant_without_a_reference_accuracy_is_told_to_bench_onnx_fp32(fleet_file, tmp_path):
    """The note for an unjudged accuracy bound told every device to bench fp32: an ONNX model compiled for ONNX
    Runtime and TensorRT variants alone has no fp32 (onnx-fp32 is its reference), so the command it gave failed. An
    ONNX variant's note names onnx-fp32, what the bound is then judged against."""
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, _bench("d2", 1, "onnx-int8", 0.1))
    assert list(mon.notes) == ["d2 onnx-int8: accuracy >= 0.99 x onnx-fp32 not judged: no onnx-fp32 benchmark of model "
                               "digits with an accuracy from d2 in the history (`edgekit bench --device d2 --variant "
                               "onnx-fp32` measures it; its other bounds are judged)"]
    mon.stop()

def test_without_an_fp32_accuracy_the_bound_is_unjudged_said_once_never_alerted(fleet_file, tmp_path):
    """No fp32 benchmark of the model on the device (or one without an accuracy): no false alert, one note per device
    and model; the other bounds are still judged."""
    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    _kept(mon, _bench("d2", 1, "fp32", None), _bench("d2", 2, "int8", 0.1), _bench("d2", 3, "int8", 0.1))
    assert not mon.alerts
    assert list(mon.notes) == ["d2 int8: accuracy >= 0.99 x fp32 not judged: no fp32 benchmark of model digits with an "
                               "accuracy from d2 in the history (`edgekit bench --device d2 --variant fp32` measures "
                               "it; its other bounds are judged)"]
    _kept(mon, _bench("d2", 4, "int8", 0.1, p90=80.0))
    assert [a.text for a in mon.alerts] == ["d2 int8: breaks p90 <= 50 ms (80 ms p90, the device's clock); a simulated "
                                            "device: this machine's figures"]
    assert mon.notes_raised == 1
    mon.stop()


def test_with_share_a_worker_judges_against_the_fp32_a_peer_stored(fleet_file, tmp_path):
    """With --share the broker hands d2's fp32 benchmark to one worker and its int8 to the other: the other reads the
    fp32 accuracy from the history (one query a batch holding benchmarks) and alerts."""
    store = Store(tmp_path / "h.db")
    a, b = (_started(fleet_file, store, share="edgekit", workers=2) for _ in range(2))
    _kept(a, _bench("d2", 1, "fp32", 0.5375))
    _kept(b, _bench("d2", 2, "int8", 0.5125))
    assert [x.text for x in b.alerts] == [EXPECTED] and not a.alerts and not b.notes
    a.stop()
    b.stop()


def test_a_share_worker_reads_the_fp32_a_peer_stored_since_its_last_look_not_the_device_s_whole_history(
        fleet_file, tmp_path, monkeypatch):
    """A worker's look for a peer's fp32 benchmark after each batch read every bench record of the device ever stored.
    It now reads those received since its last look (its start, at first), less REFERENCE_LAG_S: the peer's newer fp32
    is still what the int8 is judged against."""
    from edge_kit.telemetry.monitor import REFERENCE_LAG_S

    store = Store(tmp_path / "h.db")
    store.add_many([_bench("d2", 1, "fp32", 0.9)], received=[time.time() - 3600])  # read at start
    a, b = (_started(fleet_file, store, share="edgekit", workers=2) for _ in range(2))
    looks: list = []
    real = store.reference_accuracies
    monkeypatch.setattr(store, "reference_accuracies",
                        lambda *args, **kw: looks.append(kw.get("since")) or real(*args, **kw))
    _kept(a, _bench("d2", 2, "fp32", 0.5375))
    started = b._clock()  # by the worker's clock, the database's as measured: time.time() was 0.4 ms ahead of it once
    _kept(b, _bench("d2", 3, "int8", 0.5125))
    _kept(b, _bench("d2", 4, "int8", 0.5125))
    assert [x.text for x in b.alerts] == [EXPECTED] and not b.notes
    assert [set(since) for since in looks] == [{"d2"}] * 3
    assert looks[2]["d2"] >= started - REFERENCE_LAG_S > looks[1]["d2"] > b._clock() - 60 - REFERENCE_LAG_S
    a.stop()
    b.stop()


def test_a_device_naming_a_new_model_in_each_fp32_record_blinds_no_other_devices_bound(fleet_file, tmp_path):
    """A hostile d1 with its own valid key sends 10,001 fp32 benchmarks, each naming another model: before, they
    filled the monitor's one map of fp32 accuracies (10,000 for the whole fleet), so d2's fp32 accuracy, arriving
    after, was left out and d2's int8 losing accuracy was noted as unjudged, never alerted. Now each device keeps its
    own (:data:`MAX_REFERENCES_PER_DEVICE`, its oldest dropped): d1 only pushes out its own."""
    from edge_kit.telemetry import monitor as monitor_module

    store = Store(tmp_path / "h.db")
    mon = _started(fleet_file, store)
    flood = [_bench("d1", i + 1, "fp32", 0.5, model=f"m{i}") for i in range(10_001)]
    _kept(mon, *flood)
    _kept(mon, _bench("d2", 1, "fp32", 0.5375))
    _kept(mon, _bench("d2", 2, "int8", 0.5125))
    assert [a.text for a in mon.alerts] == [EXPECTED] and not mon.notes
    per_device = monitor_module.MAX_REFERENCES_PER_DEVICE
    assert sum(len(v) for v in mon._reference.values()) <= 2 * per_device  # bounded: the fleet's devices x the cap
    _kept(mon, _bench("d1", 10_002, "int8", 0.1, model="m10000"))  # d1's newest model is still judged
    assert [a.text for a in mon.alerts][-1].startswith("d1 int8: breaks accuracy >= 0.99 x fp32")
    mon.stop()


def test_a_share_worker_says_once_when_the_databases_clock_is_hours_off(fleet_file, tmp_path, monkeypatch):
    """With --share, receive times are stored by the database's clock (clock_offset); one hours off was taken silently,
    so every reader on a host with a right clock saw devices heard hours ahead or behind, and nothing said why. Now
    a worker says it once as a note (still using it: the peers compare by it); minutes are not said (SQLite's: 0)."""
    store = Store(tmp_path / "h.db")
    assert abs(store.clock_offset()) < 5  # SQLite: this host's clock
    monkeypatch.setattr(store, "clock_offset", lambda: -3 * 3600.0)  # a fake database clock, unit test only
    mon = _started(fleet_file, store, share="edgekit", workers=2)
    assert mon._db_offset == -3 * 3600.0
    assert [n for n in mon.notes if "clock" in n] == [
        "the history database's clock is 3.0 h behind this host's: with --share receive times are stored by the "
        "database's clock, so what reads them by another clock (edgekit fleet status, report, a monitor without "
        "--share) is off by as much; set the time (NTP) of the database's host or of this one"]
    mon.stop()
    monkeypatch.setattr(store, "clock_offset", lambda: 120.0)
    mon = _started(fleet_file, store, share="edgekit", workers=2)
    assert mon._db_offset == 120.0 and not mon.notes
    mon.stop()
