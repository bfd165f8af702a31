"""Prometheus metrics for the fleet, from what the monitor stores (prometheus-client).

Per device and variant: latency quantiles, power, energy per inference and accuracy of the latest
benchmark; per device: online state, whether it is simulated (its figures are then the simulating
machine's) and when it was last heard. Every power series carries a
``source`` label (the sensor's key, ``estimated`` or ``not measured``: :func:`~edgekit_protocol.labels.power_source`), so a dashboard can tell a
measured watt from an estimated one. From the latest ``live`` message: the serving API's requests,
errors, service-time percentiles and queue depth; from the latest ``shadow`` message: the served
outputs' SNR against the shadow model's. :meth:`FleetMetrics.observe` takes messages the monitor
stored, so checked by the protocol (:func:`~edgekit_protocol.messages.check_body`). Plus the monitor's
own counters.

A monitor that starts (again, or over a kept history) first sets the gauges from the history
(:meth:`FleetMetrics.seed`): each device's newest benchmark per variant, status, telemetry, live and shadow
figures, and when it was last heard; the messages it stores then update them as they arrive.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edge_kit.errors import InputError
from edge_kit.telemetry.store import KINDS, HistoryStore
from edgekit_protocol.labels import power_source, printable
from edgekit_protocol.messages import check_body, disk_free_bytes, field_at, in_range

# Label values a device names (variant, power source, shadow variant) make series, and each series stays
# in the monitor's memory and in every scrape: per device and label, the first MAX_LABEL_VALUES distinct
# values (of at most MAX_LABEL_CHARS characters) are kept; anything else is exported as OVERFLOW and counted
# in edgekit_metrics_label_overflow_total. Device names are the fleet file's (the monitor stores no other).
MAX_LABEL_VALUES = 32
MAX_LABEL_CHARS = 128
OVERFLOW = "other"

log = logging.getLogger("edgekit.metrics")

# The monitor's alerts that hold over an episode (Monitor.alert_states), exported per device of the fleet file:
# (alert kind, gauge, its help).
ALERT_GAUGES = (
    ("drift", "edgekit_device_drifting", "1 while the device's drift alert holds: its newest shadow comparison is "
                                         "below its min_fidelity_snr_db, or its live answers held NaN or infinity"),
    ("disk", "edgekit_device_low_disk", "1 while the device's disk alert holds: its newest status or telemetry says "
                                        "its disk is full or has less free than the monitor's --min-free-mb"),
    ("silent", "edgekit_device_silent", "1 while the device's silence alert holds: nothing stored of it for longer "
                                        "than --silence-s (longer for an agent whose telemetry interval is long)"),    ("constraints", "edgekit_device_breaking_constraints", "1 while a constraints alert of the device holds: the newest "
                                                           "benchmark of one of its variants breaks its constraints"),
)


# Where the power and live series come from, in their help (curl /metrics shows the figure's source next to it)
_POWER_SOURCE = ("its source label says where it came from: the power sensor's key, 'estimated' (the profile's idle_w "
                 "and busy_w scaled by the benchmark's CPU use; the record's power.method gives the model), or "
                 "'not measured'")
_LIVE = ("counted by the device's serving API, from its latest signed live message; a simulated device's "
         "(edgekit_device_simulated 1) by the machine simulating it")


class FleetMetrics:
    """Gauges updated from stored messages; pass :meth:`observe` as the monitor's ``on_message``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latency = Gauge("edgekit_latency_ms", "Latest benchmark latency percentile (ms; the device's perf_counter_ns around one "
                             "inference: invoke() on LiteRT, session.run() on ONNX Runtime and TensorRT, host copies "
                             "included; the bench record's latency_method says which)",
                             ["device", "variant", "quantile"], registry=r)
        self.power = Gauge("edgekit_power_watts", f"Average power during the latest benchmark (W; {_POWER_SOURCE})",
                           ["device", "variant", "source"], registry=r)
        self.energy = Gauge("edgekit_energy_per_inference_mj", "Energy per inference in the latest benchmark (mJ; "
                            f"{_POWER_SOURCE})",
                            ["device", "variant", "source"], registry=r)
        self.accuracy = Gauge("edgekit_accuracy", "Accuracy of the latest benchmark on the shipped eval set, by the "
                              "metric its label names (top1 and every built-in task's: a share, 0-1; a user metric "
                              "on its own scale)", ["device", "variant", "metric"], registry=r)
        self.simulated = Gauge("edgekit_device_simulated", "1 when the device is simulated: its latency, power, energy, "
                               "accuracy and live (serving and shadow) series are measurements of the machine simulating "
                               "it, not of its profile's hardware (its latest status or benchmark says so); 0 when it "
                               "says it is not",
                               ["device"], registry=r)
        self.online = Gauge("edgekit_device_online", "1 when the device's last status says online", ["device"], registry=r)
        self.last_seen = Gauge("edgekit_device_last_seen_seconds", "Unix time (this host's clock) the monitor last stored a message of the device",
                               ["device"], registry=r)
        self.disk_free = Gauge("edgekit_device_disk_free_bytes", "Free bytes under the agent's root (statvfs, "
                               "the device's latest status or telemetry)", ["device"], registry=r)
        self.live_requests = Gauge("edgekit_live_requests", "Requests the serving API answered with the served model "
                                   f"(live, since it was activated; {_LIVE})", ["device", "variant"], registry=r)
        self.live_errors = Gauge("edgekit_live_errors", f"Requests the serving API answered with an error (live; {_LIVE})",
                                 ["device", "variant"], registry=r)
        self.live_latency = Gauge("edgekit_live_latency_ms", "Serving API service time percentile over the last requests "
                                  f"(live; perf_counter_ns from request read to answer ready; {_LIVE})",
                                  ["device", "variant", "quantile"], registry=r)
        self.live_shadow_snr = Gauge("edgekit_live_shadow_snr_db", "Worst-output SNR of the served model's live outputs "
                                     f"against a shadow model's on the same inputs (live; {_LIVE})",
                                     ["device", "variant", "shadow"], registry=r)
        self.live_queue = Gauge("edgekit_live_queue_depth", f"Requests waiting for an interpreter (live; {_LIVE})", ["device"], registry=r)
        self.disk_full = Gauge("edgekit_device_disk_full", "1 while the agent refuses writes for lack of space",
                               ["device"], registry=r)
        self.label_overflow = Counter("edgekit_metrics_label_overflow", f"Label values a device sent beyond the first "
                                      f"{MAX_LABEL_VALUES} per label (or longer than {MAX_LABEL_CHARS} characters), "
                                      f"exported as '{OVERFLOW}'", ["device", "label"], registry=r)
        self._values: dict[tuple[str, str], set[str]] = {}

    def _bounded(self, device: str, label: str, value: Any) -> str:
        """Return ``value`` as the ``label`` value of ``device``'s series, its control characters shown as ``\\xNN``
        (:func:`~edgekit_protocol.labels.printable`: prometheus-client escapes only quotes, backslashes and newlines,
        and /metrics is read with curl too), or :data:`OVERFLOW` (counted) once the device has used up its distinct
        values for that label."""
        text = printable(value)
        seen = self._values.setdefault((device, label), set())
        if text in seen:
            return text
        if len(seen) >= MAX_LABEL_VALUES or len(text) > MAX_LABEL_CHARS or text == OVERFLOW:
            self.label_overflow.labels(device, label).inc()
            return OVERFLOW
        seen.add(text)
        return text

    def seed(self, store: HistoryStore, devices: Iterable[str]) -> int:
        """Set the gauges of ``devices`` (the fleet file's) from what ``store`` holds: per device, the newest bench
        record of each variant, its newest status, telemetry, live and shadow messages (online state, disk, live
        figures, shadow SNR: the drift alert's figure) and when this host last stored a message of it (any kind). Each row
        is checked by the protocol (:func:`~edgekit_protocol.messages.check_body`: a history row holds what was
        stored, checked by the protocol of its day); one that fails is left out, said in the log. Return the
        messages taken.

        Raises:
            HistoryError: the history cannot be read.
        """
        wanted = set(devices)
        # oldest first, so each (device, variant) ends on its newest record (recent_bench ranks newest first)
        rows = [("bench", m) for m in reversed(list(store.latest_bench().values()))]
        for kind, latest in (("status", store.latest_status()), ("telemetry", store.latest_telemetry()),
                             ("live", store.latest_live()), ("shadow", store.latest_shadow())):
            rows += [(kind, m) for m in latest.values()]
        taken = 0
        for kind, msg in rows:
            if msg.get("device") not in wanted:
                continue
            try:  # checked as the monitor checks what it stores: a gauge never half set by a row it cannot read
                self._update(kind, check_body(kind, msg))
                taken += 1
            except Exception as exc:  # noqa: BLE001 - one odd row never keeps the others out of /metrics
                log.warning("metrics: %s %s of %r left out (%s: %s)", kind, msg.get("msg_id"), msg.get("device"),
                            type(exc).__name__, exc)
        for device, heard in store.last_received(KINDS).items():  # any kind stored, as observe() counts them
            if device in wanted:
                self.last_seen.labels(device).set(heard)
        return taken

    def observe(self, kind: str, msg: dict[str, Any]) -> None:
        """Update the gauges from one stored message (just stored: last heard is now, by this host's clock;
        the device's ``ts`` may be decades behind, before NTP, or minutes ahead); return nothing."""
        self.last_seen.labels(msg["device"]).set(time.time())
        self._update(kind, msg)

    def _update(self, kind: str, msg: dict[str, Any]) -> None:
        """Update the figures' gauges (all but last heard) from one message; return nothing."""
        device = msg["device"]
        disk = msg.get("disk") if kind in ("status", "telemetry") else None
        if disk_free_bytes(disk) is not None:
            self.disk_free.labels(device).set(disk_free_bytes(disk))
            self.disk_full.labels(device).set(1 if disk.get("full") else 0)
        if kind == "live":  # the protocol checked the model reference (text or null) and the counts (whole, >= 0)
            variant = self._bounded(device, "variant", msg["model"].get("variant"))
            self.live_requests.labels(device, variant).set(msg["requests"])
            self.live_errors.labels(device, variant).set(msg["errors"])
            if msg.get("queue_depth") is not None:
                self.live_queue.labels(device).set(msg["queue_depth"])
            for q in ("p50", "p90", "p99"):
                v = field_at(msg, "latency_ms", q)
                if v is not None:
                    self.live_latency.labels(device, variant, q).set(v)
        elif kind == "shadow":
            snr = field_at(msg, "fidelity", "snr_db")
            if snr is not None:
                self.live_shadow_snr.labels(device, self._bounded(device, "variant", msg["serving"].get("variant")),
                                            self._bounded(device, "shadow", msg["model"].get("variant"))).set(snr)
        if kind in ("status", "bench") and isinstance(msg.get("simulated"), bool):
            self.simulated.labels(device).set(1 if msg["simulated"] else 0)
        if kind == "status":
            self.online.labels(device).set(1 if msg["state"] == "online" else 0)
        elif kind == "bench":
            variant = self._bounded(device, "variant", msg["variant"])
            for q in ("p50", "p90", "p99"):
                self.latency.labels(device, variant, q).set(msg["latency_ms"][q])
            power = msg["power"]
            source = self._bounded(device, "source", power_source(power))
            # each figure when the record has it: a power block may lack energy, and a metric that failed on
            # the device is recorded as ``accuracy: {"error": ...}`` with no value
            for gauge, value in ((self.power, power.get("avg_w")), (self.energy, power.get("energy_per_inference_mj"))):
                if _number(value) is not None:
                    gauge.labels(device, variant, source).set(value)
            accuracy = _number(field_at(msg, "accuracy", "value"))
            if accuracy is not None:
                metric = self._bounded(device, "metric", field_at(msg, "accuracy", "metric") or "unnamed")
                self.accuracy.labels(device, variant, metric).set(accuracy)

    def watch(self, monitor: Any) -> None:
        """Also export the monitor's counters (received, stored, duplicates, invalid, gaps, dropped, over_budget), the
        records refused over each device's ingest budget and, per device of the fleet file, whether its drift, low-disk,
        silence and constraints alerts hold (:meth:`~edge_kit.telemetry.monitor.Monitor.alert_states`: from the history when the
        monitor started, then from what arrives); return nothing."""
        stats = monitor.stats

        class _Counters:
            def collect(self) -> Any:
                fam = CounterMetricFamily("edgekit_monitor_messages", "Messages seen by this monitor worker", labels=["outcome"])
                for outcome in ("received", "stored", "duplicates", "invalid", "gaps", "dropped", "over_budget"):
                    fam.add_metric([outcome], getattr(stats, outcome))
                yield fam
                over = CounterMetricFamily("edgekit_monitor_over_budget", "Records of the device refused unchecked "
                                           "because it sent more than its ingest budget (--budget-rate, --budget-burst)",
                                           labels=["device"])
                for device, count in sorted(dict(monitor.over_budget).items()):  # a copy: the checker adds devices
                    over.add_metric([device], count)
                yield over
                holding = monitor.alert_states()  # none until the monitor has read the history: no 0 it does not know
                for kind, name, text in (g for g in ALERT_GAUGES if g[0] in holding):
                    gauge = GaugeMetricFamily(name, text, labels=["device"])
                    for device in sorted(monitor.constraints):
                        gauge.add_metric([device], 1 if device in holding[kind] else 0)
                    yield gauge

        self.registry.register(_Counters())

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``addr:port`` (port 0: a free one); return the server (``shutdown()`` stops it;
        ``server_port`` is the port it bound).

        Raises:
            InputError: the address cannot be bound (in use, not this host's, or not an address).
        """
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except (OSError, OverflowError) as exc:
            raise InputError(f"--metrics-addr {addr} --metrics-port {port}: cannot serve /metrics there "
                             f"({getattr(exc, 'strerror', None) or exc}); choose a free port or another address") from None
        return server


    def wait_served(self, url: str, timeout: float = 10.0) -> None:
        """Return once ``url`` (this registry's ``/metrics``, :meth:`serve`) answers with the ``# HELP`` and ``# TYPE``
        of every series the registry exports now (the alert gauges of a watched monitor once it has read the
        history): so a URL printed after it is one a scrape gets whole. Asked directly, never through a proxy.

        Raises:
            InputError: it did not answer so within ``timeout`` seconds (what it answered, or why not, is said).
        """
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        wanted = {family.name for family in self.registry.collect()}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no http_proxy in between
        deadline = time.monotonic() + timeout
        why = "no answer"
        while True:
            try:
                with opener.open(url, timeout=max(0.5, deadline - time.monotonic())) as answer:
                    text = answer.read().decode()
                served = {family.name for family in text_string_to_metric_families(text)}
                missing = wanted - served
                if not missing:
                    return
                why = f"no HELP/TYPE of {', '.join(sorted(missing)[:3])}"
            except (OSError, ValueError) as exc:  # not answering yet, or an answer that is no exposition text
                why = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise InputError(f"{url}: /metrics did not answer with every series within {timeout:g} s ({why}); "
                                 "check that nothing else answers on that address and port")
            time.sleep(0.05)


def metrics_url(addr: str, port: int) -> str:
    """Return the URL of ``/metrics`` served on ``addr:port`` (an IPv6 address in brackets)."""
    host = f"[{addr}]" if ":" in addr else addr
    return f"http://{host}:{port}/metrics"


def metrics_where(addr: str, port: int) -> str:
    """Return where ``/metrics`` served on ``addr:port`` is scraped, for a person: its URL, and for a wildcard
    address (``0.0.0.0``, ``::``: every address of this host, which no other host can connect to as such) the URL by
    this host's name too."""
    url = metrics_url(addr, port)
    if addr not in ("0.0.0.0", "::", ""):
        return url
    return f"{url} (every address of this host: from another host, http://{socket.gethostname()}:{port}/metrics)"


def _number(value: Any, minimum: float | None = None) -> float | None:
    """Return ``value`` when it is a number (not a bool) within +-1e12 (:func:`~edgekit_protocol.messages.in_range`:
    finite, and an integer a float can hold) and not below ``minimum`` (when given), else None."""
    return value if in_range(value) and (minimum is None or value >= minimum) else None
