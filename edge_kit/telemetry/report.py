"""`edgekit report`: one self-contained HTML file a person reads (plotly.js inlined, no network).

Per device profile (the fleet file's for the devices it names: a record's ``profile`` is only its device's word,
and one device claiming another profile must not land among that profile's devices): latency p90 against
accuracy (the eval metric) for every variant measured on every device of that profile, with the profile's
constraint lines (max p90; min accuracy as a share of the fp32 variant's, else onnx-fp32's, its median over the
devices) and each device's chosen variant marked; energy per inference per variant (the median over devices), each bar
saying whether its figure was measured (sensor name) or estimated. Then the fleet table. Every figure is
the latest benchmark record in the history store; simulated devices are labelled. One device's figures move
no line and no bar: each is a median over the devices.
"""

from __future__ import annotations

import html
import math
import stat
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.bench import thin_tail
from edge_kit.errors import InputError
from edge_kit.fleet.keys import revoked_on
from edge_kit.fsutil import atomic_write_text, writable_folder
from edge_kit.profiles import Profile, bundled_profiles, load_profile
from edge_kit.selection.constraints import REFERENCE_VARIANTS
from edge_kit.telemetry.store import CLEARED_REVOKED, CLEARED_STALE, HistoryStore
from edgekit_protocol.config import AgentConfig
from edgekit_protocol.labels import accuracy_text, clip, power_source
from edgekit_protocol.messages import field_at, in_range

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#b00}.note{color:#666;font-size:12px}
"""


def latency_clocks(records: list[dict[str, Any]]) -> list[str]:
    """Return how the bench ``records`` timed their latency, each ``"<latency_method> (<runtime>)"`` once, sorted
    (e.g. ``time.perf_counter_ns around session.run() (onnxruntime)``): every clock that measured them, never one
    assumed for all. A device's words are cut (:func:`~edgekit_protocol.labels.clip`), and past 8 clocks the
    rest are counted."""
    clocks = sorted({f"{clip(str(r.get('latency_method') or 'clock not named'), 120)} "
                     f"({clip(str(r.get('runtime') or 'runtime not named'), 40)})" for r in records})
    return clocks if len(clocks) <= 8 else [*clocks[:8], f"{len(clocks) - 8} other clocks"]


def live_clocks(live: dict[str, Any]) -> list[str]:
    """Return how the devices' serving APIs timed their latest ``live`` figures (device -> message), each
    ``clock`` they name once, sorted (cut as :func:`latency_clocks` cuts); empty when none has latency figures."""
    return sorted({clip(str(m.get("clock") or "clock not named"), 120) for m in live.values()
                   if isinstance(m, dict) and isinstance(m.get("latency_ms"), dict)})


def _power_source(rec: dict[str, Any]) -> str:
    """Return the power label of a bench record (see :func:`edgekit_protocol.labels.power_source`)."""
    return power_source(rec.get("power") or {})


def _accuracy(rec: dict[str, Any]) -> float | None:
    """Return the accuracy figure of a bench record, or None when it has none: not scored (no eval set), or
    the metric failed on the device (the agent then records ``{"error": ..., "samples": n}``, no value)."""
    value = (rec.get("accuracy") or {}).get("value") if isinstance(rec.get("accuracy"), dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _accuracy_cell(rec: dict[str, Any] | None) -> str:
    """Return the fleet table's accuracy cell (HTML): the figure and the eval metric it is of (``99.00% (top1)``;
    the metric escaped and cut, as the device sent it), ``not scored`` when the metric failed, else ``-``."""
    if rec and _accuracy(rec) is not None:
        metric = rec["accuracy"].get("metric")
        return accuracy_text(_accuracy(rec)) + (f" ({_cell(metric, 32)})" if isinstance(metric, str) and metric else "")
    return "not scored" if rec and isinstance(rec.get("accuracy"), dict) and "error" in rec["accuracy"] else "-"


MAX_NAME_CHARS = 128  # a device's name for a variant, runtime or profile, as the report shows it


def _label(value: Any) -> str:
    """Return a device's text for a plotly label: plotly renders a subset of HTML in names, hover text and
    ticks (links, styles, line breaks), so every tag a device sends is shown as text, not obeyed; cut to
    :data:`MAX_NAME_CHARS` (saying how long it was)."""
    return html.escape(clip(str(value), MAX_NAME_CHARS), quote=False)


def _cell(value: Any, chars: int = MAX_NAME_CHARS) -> str:
    """Return a device's text for a table cell: escaped, cut to ``chars`` (:data:`MAX_NAME_CHARS`)."""
    return html.escape(clip(str(value), chars))


MAX_VARIANTS_PER_DEVICE = 32  # a device's distinct variant names plotted (its newest); as many as /metrics keeps


def bounded_variants(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Return the bench ``records`` (newest first, as the history gives them) to plot: each device's records of its
    :data:`MAX_VARIANTS_PER_DEVICE` newest distinct variant names, and ``{device: records left out}`` for a device
    that named more. A device inventing thousands of names would otherwise flood every plot's legend (and the
    page) with traces; real devices name a handful."""
    names: dict[str, set[str]] = defaultdict(set)
    kept, left_out = [], defaultdict(int)
    for r in records:
        seen, label = names[r["device"]], _label(r["variant"])
        if label not in seen and len(seen) >= MAX_VARIANTS_PER_DEVICE:
            left_out[r["device"]] += 1
            continue
        seen.add(label)
        kept.append(r)
    return kept, dict(left_out)


def _profile_figures(profile: Profile, records: list[dict[str, Any]], chosen: dict[str, str | None]) -> list[Any]:
    """Return the profile's two figures (latency against accuracy, energy per inference) of its bench ``records``
    (``chosen``: each device's chosen sha256, starred). A name a device gave (variant, metric, power source) goes into
    a hover label as data (``text``, ``customdata``), never into a ``hovertemplate``: plotly reads ``%{...}`` in a
    template as a placeholder, so a variant named ``%{y}`` would show another figure in its tooltip; a value
    substituted for a placeholder is shown as it is."""
    import plotly.graph_objects as go

    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_variant[_label(r["variant"])].append(r)
    # the reference the accuracy floor is a share of: fp32, else onnx-fp32 (an ONNX model without a LiteRT conversion)
    ref_id = next((v for v in REFERENCE_VARIANTS if any(_accuracy(r) is not None for r in by_variant.get(v, []))),
                  REFERENCE_VARIANTS[0])
    ref_accuracies = [_accuracy(r) for r in by_variant.get(ref_id, []) if _accuracy(r) is not None]
    # shares (every built-in task) in percent; a user metric outside 0..1 on its own scale
    scale = 100 if all(0 <= _accuracy(r) <= 1 for r in records if _accuracy(r) is not None) else 1
    unit = " %" if scale == 100 else ""
    metric = _label(next((r["accuracy"].get("metric") for r in records if _accuracy(r) is not None
                          and r["accuracy"].get("metric")), "accuracy"))
    scatter = go.Figure()
    for variant, recs in sorted(by_variant.items()):
        # simulated devices a trace of their own (open markers): their figures are the simulating machine's
        for simulated in (False, True):
            pts = [r for r in recs if _accuracy(r) is not None and (r.get("simulated") is True) == simulated]
            if not pts:
                continue
            scatter.add_trace(go.Scatter(
                x=[r["latency_ms"]["p90"] for r in pts], y=[scale * _accuracy(r) for r in pts], mode="markers",
                name=f"{variant} ({_label(pts[0].get('runtime') or 'litert')}){', simulated' if simulated else ''}",  # its runtime
                marker={"size": 10, "symbol": "circle-open" if simulated else "circle"},
                text=[f"{r['device']}{' (simulated)' if simulated else ''}, {_label(r.get('runtime') or 'litert')}" for r in pts],
                # names a device gave (the variant, the metric) as data, never in the template: it reads %{...}
                customdata=[[variant, metric]] * len(pts),
                hovertemplate=f"%{{text}}<br>p90 %{{x:.4g}} ms<br>%{{customdata[1]}} %{{y:.4g}}{unit}"
                              "<extra>%{customdata[0]}</extra>"))
    picks = [r for r in records if chosen.get(r["device"]) == r["sha256"] and _accuracy(r) is not None]
    if picks:
        scatter.add_trace(go.Scatter(
            x=[r["latency_ms"]["p90"] for r in picks], y=[scale * _accuracy(r) for r in picks], mode="markers",
            name="chosen", marker={"symbol": "star", "size": 20, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "#111"}},
            text=[f"{r['device']}{' (simulated)' if r.get('simulated') else ''}: {_label(r['variant'])}" for r in picks],
            hovertemplate="%{text}<extra>chosen</extra>"))
    c = profile.constraints
    # A log x axis: the variants of a small model sit at tenths of a millisecond while the profile's
    # limit may be 50 ms; on a linear axis reaching the limit they would all fall on one vertical line.
    # The range is set explicitly (plotly wants it in decades) to hold every point and the limit.
    xs = [r["latency_ms"]["p90"] for r in records if _accuracy(r) is not None and r["latency_ms"]["p90"] > 0]
    if c.max_latency_p90_ms is not None and c.max_latency_p90_ms > 0:
        xs.append(c.max_latency_p90_ms)
    xaxis: dict[str, Any] = {"type": "log"}
    if xs:
        pad = max(0.1, 0.05 * (math.log10(max(xs)) - math.log10(min(xs))))
        xaxis["range"] = [math.log10(min(xs)) - pad, math.log10(max(xs)) + pad]
    if c.max_latency_p90_ms is not None:
        scatter.add_vline(x=c.max_latency_p90_ms, line_dash="dash", line_color="#b00")
        if c.max_latency_p90_ms > 0:  # annotations on a log axis take the decade, not the value
            scatter.add_annotation(x=math.log10(c.max_latency_p90_ms), xref="x", y=1, yref="y domain", yanchor="bottom",
                                   xanchor="right", showarrow=False, text=f"max p90 {c.max_latency_p90_ms:g} ms")
    reference = statistics.median(ref_accuracies) if ref_accuracies else None  # one device's figure moves no line
    if c.min_accuracy_ratio is not None and reference is not None and reference > 0:  # no ratio to 0 or less
        floor = scale * c.min_accuracy_ratio * reference
        scatter.add_hline(y=floor, line_dash="dash", line_color="#b00",
                          annotation_text=f"min accuracy {c.min_accuracy_ratio:g} x {ref_id} = {floor:.4g}{unit}")
    scatter.update_layout(title=f"{profile.name}: latency vs accuracy (latest benchmark per device and variant)",
                          xaxis_title="p90 latency (ms, log scale), measured on each device (clock: see the note above)",
                          yaxis_title=f"{metric} ({'%' if scale == 100 else 'on its own scale'})", xaxis=xaxis,
                          height=460, margin={"t": 60})
    bars = go.Figure()
    variants = sorted(v for v, recs in by_variant.items() if any((r.get("power") or {}).get("energy_per_inference_mj") is not None for r in recs))
    # one series per source, and simulated devices apart: their figures (this machine's CPU use) never
    # average into a real device's of the same source
    def series(r: dict[str, Any]) -> str:
        return _label(_power_source(r)) + (", simulated devices" if r.get("simulated") is True else "")

    for source in sorted({series(r) for r in records}):
        ys, texts = [], []
        for v in variants:
            vals = [r["power"]["energy_per_inference_mj"] for r in by_variant[v]
                    if series(r) == source and r["power"].get("energy_per_inference_mj") is not None]
            ys.append(statistics.median(vals) if vals else None)  # one device's outlandish figure moves no bar
            texts.append(f"{len(vals)} device(s)")
        bars.add_trace(go.Bar(x=variants, y=ys, name=f"{source}", text=texts, customdata=[source] * len(variants),
                              hovertemplate="%{x}: %{y:.4g} mJ<br>%{text}<extra>%{customdata}</extra>"))
    bars.update_layout(title=f"{profile.name}: energy per inference (median over devices; legend: how it was obtained)",
                       yaxis_title="mJ per inference", barmode="group", height=380, margin={"t": 60},
                       # plotly hides the legend of a single series: it is the only place saying how the bars were
                       # obtained (estimated, a sensor, simulated devices), so it is always shown
                       showlegend=True)
    return [scatter, bars]


@dataclass(frozen=True)
class Newest:
    """What the report shows of the history's newest messages, read once (:meth:`read`) and passed to every part
    of the page and of ``--json``: each device's newest ``status``, ``live`` message and decision (any kind), and
    the newest ``bench`` record per ``(device, sha256)``."""

    status: dict[str, dict[str, Any]]
    bench: dict[tuple[str, str], dict[str, Any]]
    live: dict[str, dict[str, Any]]
    decisions: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, store: HistoryStore) -> Newest:
        """Return the newest messages of ``store``, one query each. Raises HistoryError."""
        return cls(store.latest_status(), store.latest_bench(), store.latest_live(), store.latest_decisions())


def _fleet_rows(newest: Newest, profiles: dict[str, str] | None = None,
                others: set[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Return the fleet table's head and rows (HTML cells), one row per device of ``newest`` and of ``others`` (the
    history's other devices, :meth:`~edge_kit.telemetry.store.HistoryStore.devices`: in a rollout, an alert, with no
    status or record); ``profiles``: the fleet file's profile of each device it names, shown rather than what the
    device's records say. Raises nothing."""
    profiles = profiles or {}
    status, latest, live, decisions = newest.status, newest.bench, newest.live, newest.decisions
    head = ["device", "profile", "state", "running", "runtime", "decision", "bench p90 ms", "accuracy", "mJ/inference", "power source",
            "live p50/p99 ms (requests)", "simulated"]
    rows = []
    for device in sorted(set(status) | {d for d, _ in latest} | set(decisions) | (others or set())):
        st = status.get(device, {})
        cur, rec = _running(st, latest, device)
        dec = decisions.get(device)
        verdict = _verdict(dec)
        claimed = (rec or {}).get("profile") or st.get("profile") or "-"
        rows.append([html.escape(device), _cell(profiles.get(device) or claimed),
                     _cell(st.get("state", "never seen")), _cell(cur.get("variant") or "-"),
                     _cell((rec or {}).get("runtime") or "-"),  # litert / onnxruntime / tensorrt, as measured
                     verdict,
                     f"{rec['latency_ms']['p90']:.4g}" if rec else "-",
                     _accuracy_cell(rec),
                     f"{rec['power']['energy_per_inference_mj']:.4g}" if rec and rec["power"].get("energy_per_inference_mj") is not None else "-",
                     html.escape(_power_source(rec)) if rec else "-", _live_cell(live.get(device)),
                     _simulated_cell(rec, st)])
    return head, rows


def _running(status: dict[str, Any], latest: dict[tuple[str, str], dict[str, Any]],
             device: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Return the model ``device``'s newest ``status`` says it runs (``{}`` when it names none) and the latest
    bench record of that model among ``latest`` (None when it was not benchmarked)."""
    cur = status.get("current") if isinstance(status.get("current"), dict) else {}  # a device's own word: any shape
    return cur, latest.get((device, cur.get("sha256"))) if cur else None


def _figure(value: Any) -> Any:
    """Return a device's figure for ``--json``: the number when it is one (:func:`in_range`), else None."""
    return value if in_range(value) else None


def _text(value: Any) -> str | None:
    """Return a device's text for ``--json``, cut to :data:`MAX_NAME_CHARS` (None when it sent none)."""
    return None if value is None else clip(str(value), MAX_NAME_CHARS)


def figure_rows(newest: Newest) -> list[dict[str, Any]]:
    """Return the figures behind the fleet table, one row per device and source, labelled by ``source``:
    ``bench`` (the latest benchmark record of the model the device's newest status says it runs: p50/p90/p99
    by the clock it names, accuracy, energy and how it was obtained) and ``live`` (its newest ``live`` message:
    the serving API's requests, errors and service-time p50/p90/p99 over its last ``window`` requests, for the
    model it names). Each row names its message (``msg_id``, ``seq``): a record the device signed, as the
    monitor (or tune) checked and stored it; and ``simulated`` as the fleet table's column says it
    (:func:`_simulated`: a simulated device's live figures are the simulating machine's too). What a device names
    is cut to :data:`MAX_NAME_CHARS`; a figure that is no number is None. Sorted by device, ``bench`` before ``live``. ``newest``: :meth:`Newest.read`."""
    status, latest, live = newest.status, newest.bench, newest.live
    rows: list[dict[str, Any]] = []
    for device in sorted(set(status) | {d for d, _ in latest} | set(live)):
        _cur, rec = _running(status.get(device, {}), latest, device)
        simulated = _simulated(rec, status.get(device, {}))  # the device's, as the fleet table's column says it
        if rec is not None:
            lat = rec.get("latency_ms") if isinstance(rec.get("latency_ms"), dict) else {}
            power = rec.get("power") if isinstance(rec.get("power"), dict) else {}
            rows.append({"device": device, "source": "bench", "variant": _text(rec.get("variant")),
                         "sha256": _text(rec.get("sha256")), **{f"{q}_ms": _figure(lat.get(q)) for q in ("p50", "p90", "p99")},
                         "clock": _text(rec.get("latency_method")), "runtime": _text(rec.get("runtime")),
                         "accuracy": _accuracy(rec), "energy_mj": _figure(power.get("energy_per_inference_mj")),
                         "power_source": _power_source(rec), "simulated": simulated,
                         "msg_id": rec["msg_id"], "seq": rec["seq"]})
        m = live.get(device)
        if m is not None:
            lat = m.get("latency_ms") if isinstance(m.get("latency_ms"), dict) else {}
            rows.append({"device": device, "source": "live", "variant": _text(field_at(m, "model", "variant")),
                         "sha256": _text(field_at(m, "model", "sha256")), "requests": _figure(m.get("requests")),
                         "errors": _figure(m.get("errors")), "window": _figure(m.get("window")),
                         **{f"{q}_ms": _figure(lat.get(q)) for q in ("p50", "p90", "p99")},
                         "clock": _text(m.get("clock")), "simulated": simulated, "msg_id": m["msg_id"], "seq": m["seq"]})
    return rows


def _simulated(rec: dict[str, Any] | None, status: dict[str, Any]) -> bool | None:
    """Return whether a device is simulated as the benchmark record ``rec``, else its latest ``status``, says, or
    None when neither says (a device never heard from is not called real). Raises nothing."""
    said = (rec or {}).get("simulated")
    said = status.get("simulated") if not isinstance(said, bool) else said
    return said if isinstance(said, bool) else None


def _simulated_cell(rec: dict[str, Any] | None, status: dict[str, Any]) -> str:
    """Return the fleet table's "simulated" cell: :func:`_simulated` as ``yes``/``no``, or "-" when nothing says."""
    said = _simulated(rec, status)
    return "-" if said is None else ("yes" if said else "no")


def _verdict(dec: dict[str, Any] | None) -> str:
    """Return the fleet table's decision cell (HTML): the chosen variant and whether it is feasible, or, when
    nothing was chosen (candidates not measured yet), why not; never "infeasible" for what was not judged, and
    "feasible" names the bounds it did not judge."""
    if not dec:
        return "-"
    if dec.get("chosen") is None:
        return html.escape(f"none yet: {dec.get('reason') or 'nothing chosen'}")
    if dec["feasible"]:
        blind = dec.get("unjudged") if isinstance(dec.get("unjudged"), list) else []
        return html.escape(f"{dec['chosen']} (feasible" + (f"; not judged: {', '.join(map(str, blind))})" if blind else ")"))
    return (f"<span class=bad>{html.escape(str(dec['chosen']))} infeasible: "
            f"{html.escape(', '.join(dec.get('violates') or [str(dec.get('reason'))]))}</span>")


def _live_cell(live: Any) -> str:
    """Return the serving API's figures of a device's latest ``live`` message, or "-"."""
    if not isinstance(live, dict) or not isinstance(live.get("latency_ms"), dict):
        return "-"
    lat = live["latency_ms"]

    def num(v: Any, fmt: str) -> str:  # what a device sends: a figure only when it is one (a float can hold it)
        return format(v, fmt) if in_range(v) else "?"

    model = live.get("model") if isinstance(live.get("model"), dict) else {}
    window = live.get("window")  # the requests the percentiles were taken over (the agent's last 2,048 at most)
    thin = thin_tail(window, "request(s) in the window") if isinstance(window, int) and in_range(window) else ""
    return html.escape(f"{num(lat.get('p50'), '.3g')}/{num(lat.get('p99'), '.3g')} ({num(live.get('requests'), ',')}, "
                       f"{clip(str(model.get('variant')), MAX_NAME_CHARS)}{thin})")


def _gate_rows(store: HistoryStore) -> tuple[list[list[str]], list[str]]:
    """Return one row per live-gate decision, newest first (when, canary, candidate, action and its numbers), and the
    clocks those decisions' devices named for their service times, each once, sorted (cut as :func:`latency_clocks`
    cuts; a decision stored before they were recorded names none)."""
    rows, clocks = [], set()
    for d in store.decisions(limit=100_000, kinds=("live gate",)):
        g = d.get("gate")
        if d.get("kind") != "live gate" or not isinstance(g, dict):
            continue
        clocks.update(clip(str(c), 120) for c in (g.get("clocks") if isinstance(g.get("clocks"), list) else [])[:8])
        num = (lambda v, f: "-" if v is None else format(v, f))
        rows.append([local_time(d["recorded"]), html.escape(d["device"]),
                     html.escape(str(d.get("chosen"))), html.escape(g["action"]), html.escape(g["reason"]),
                     f"{num(g.get('canary_p50_ms'), '.3g')} / {num(g.get('control_p50_ms'), '.3g')}"
                     + (f" ({g['slowdown']:+.0%} within profiles)" if isinstance(g.get("slowdown"), (int, float)) else ""),
                     f"{g.get('canary_samples', 0):,} / {g.get('control_samples', 0):,}",
                     num(g.get("p_value"), ".2g") + (f" on {html.escape(str(g['unit']))}" if g.get("unit") else ""),
                     num(g.get("worst_snr_db"), ".1f"), html.escape(", ".join(g.get("controls") or []))])
    ordered = sorted(clocks)
    return rows, ordered if len(ordered) <= 8 else [*ordered[:8], f"{len(ordered) - 8} other clocks"]


# A device whose history says online but that has sent nothing for this many telemetry intervals is shown
# "stale" (its agent may have stopped while no monitor ran): the interval is the one its newest telemetry says
# (``interval_s``), else the one a deploy gives every agent (the protocol's default) for an agent that does not say.
STALE_INTERVALS = 3
TELEMETRY_INTERVAL_S = AgentConfig.telemetry_interval_s


def device_state(status: dict[str, Any] | None, heard: float | None, retained: dict[str, Any] | None,
                 now: float, interval_s: float | None = None, revoked: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return what is known of one device's state: ``state`` (its status's word, ``stale`` or ``never seen``),
    ``source`` (``broker``: the status its broker holds retained, verified as the device's; ``history``:
    the newest one stored; None), ``said`` (the history's word), ``silent_s`` (since this host last stored
    one of its messages, by its own clock), ``stale_after_s``, ``interval_s`` (the telemetry interval that
    rule used) and ``interval_source`` (``device``: ``interval_s`` as its newest telemetry says it; ``default``:
    :data:`TELEMETRY_INTERVAL_S`, for an agent that does not say).

    The broker's retained status is what the agent said last, or its last will once its connection died,
    so it wins. From the history alone, an ``online`` older than :data:`STALE_INTERVALS` telemetry
    intervals is ``stale``: nothing proves the agent still runs. A device whose key was revoked (``revoked``: its
    revoked-list entry, :meth:`~edge_kit.fleet.keys.FleetKeys.revoked_devices`) is ``revoked`` whatever it said
    (source ``revoked list``, ``revoked_on`` when): nothing it signs is taken any more.
    """
    said = (status or {}).get("state")
    silent = None if heard is None else max(0.0, now - heard)
    interval, source = (interval_s, "device") if interval_s is not None else (TELEMETRY_INTERVAL_S, "default")
    after = STALE_INTERVALS * interval
    base = {"said": said, "silent_s": silent, "stale_after_s": after, "interval_s": interval, "interval_source": source}
    if revoked is not None:
        return {**base, "state": "revoked", "source": "revoked list", "revoked_on": revoked_on(revoked)}
    if retained is not None:
        return {**base, "state": retained.get("state"), "source": "broker"}
    if status is None:
        return {**base, "state": "never seen", "source": None}
    stale = said == "online" and (silent is None or silent > after)
    return {**base, "state": "stale" if stale else said, "source": "history"}


FLEET_KIND = "fleet selection"  # edge_kit.selection.fleetmodel.KIND (telemetry does not import selection)


def flagged_devices(newest: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Return {device: why} for the devices whose newest fleet-selection decision flags them as differing
    from their profile; ``newest``: those decisions by device, as ``store.latest_decisions((FLEET_KIND,))``
    returns them."""
    return {name: d["flagged"] for name, d in sorted(newest.items()) if d.get("flagged")}


def _fleet_selection_rows(newest: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Return one row per device of ``newest`` (its newest fleet-model decision, by device): chosen, confidence,
    which figures were measured on the device and which inferred from its profile (chosen variant's p90 with
    its interval where inferred), whether it is flagged and why, drift."""
    rows = []
    for name, d in sorted(newest.items()):
        table = d.get("table") or []
        measured = [r["variant"] for r in table if r.get("source") == "measured"]
        inferred = []
        for r in table:
            if r.get("source") != "inferred":
                continue
            lo_hi = r.get("p90_ms_interval")
            inferred.append(f"{r['variant']} (p90 ~{r['p90_ms']:.3g} ms" + (f", 90 % {lo_hi[0]:.3g}-{lo_hi[1]:.3g})" if lo_hi else ")")
                            if r.get("p90_ms") is not None else r["variant"])
        sure = d.get("confidence", 1.0)  # None: no choice was made (nothing to infer from), so no confidence in it
        rows.append([html.escape(name), html.escape(str(d.get("chosen") or "-")),
                     "-" if d.get("chosen") is None or not isinstance(sure, (int, float)) else f"{sure:.2f}",
                     html.escape(", ".join(measured) or "-"), html.escape("; ".join(inferred) or "-"),
                     f"<span class=bad>{html.escape(d['flagged'])}</span>" if d.get("flagged") else "-",
                     html.escape("; ".join(d.get("drift") or []) or "-")])
    return rows


UNSHOWN_ROWS = 10  # refused messages and sequence gaps the page lists (the newest); `edgekit history` lists more
MAX_REASON_CHARS = 300  # of a refusal's reason on the page (it may quote the sender)


def local_time(ts: Any) -> str:
    """Return a history row's ``ts`` (this host's clock, unix seconds) as local time (``2026-11-30 09:00:00``), or "-"
    when it is no number: how the report and ``edgekit history`` show when something was stored."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if in_range(ts) else "-"


def _unshown_tables(store: HistoryStore, refused: int, gaps: int) -> str:
    """Return the page's tables (HTML) of the :data:`UNSHOWN_ROWS` newest refused messages and sequence gaps, of
    ``refused`` and ``gaps`` in all, or "" when there are none. Their topics and reasons are a sender's text (a
    forger's): every cell is escaped and cut. Raises HistoryError."""
    if not refused and not gaps:
        return ""
    part = ("<h2>Refused messages and sequence gaps</h2><p class=note>What no figure above shows, newest first: the "
            f"messages the monitor (or tune, or a deploy) refused ({refused:,} in all) and the sequence numbers a device "
            f"gave that never arrived ({gaps:,} gap(s) in all); the {UNSHOWN_ROWS} newest of each. "
            "<code>edgekit history refused</code> and <code>edgekit history gaps</code> list them by device and time. "
            "Times are this host's clock when it refused or recorded them; a refused message's device is the one its "
            "topic names (its sender's word).</p>")
    rows = store.refused_messages(limit=UNSHOWN_ROWS) if refused else []
    if rows:
        part += ("<table><tr><th>when</th><th>device (its topic's)</th><th>topic</th><th>why</th><th>bytes kept</th></tr>"
                 + "".join(f"<tr><td>{local_time(r['ts'])}</td><td>{_cell(r['device'] or '-')}</td><td>{_cell(r['topic'], 256)}"
                           f"</td><td>{_cell(r['reason'], MAX_REASON_CHARS)}</td><td class=num>{r['bytes']:,}</td></tr>"
                           for r in rows) + "</table>")
    rows = store.sequence_gaps(limit=UNSHOWN_ROWS) if gaps else []
    if rows:
        part += ("<table><tr><th>recorded</th><th>device</th><th>kind</th><th>seq missing</th><th>how many</th></tr>"
                 + "".join(f"<tr><td>{local_time(r['ts'])}</td><td>{_cell(r['device'])}</td><td>{_cell(r['kind'])}</td>"
                           f"<td>{_cell(r['first_missing'])}..{_cell(r['last_missing'])}</td>"
                           f"<td class=num>{_cell(r['missing'])}</td></tr>" for r in rows) + "</table>")
    return part


MAX_OPEN_ALERTS = 100  # alerts that hold listed on the page (the newest); `edgekit history alerts --open` lists more


def alert_cleared_text(row: dict[str, Any]) -> str:
    """Return how a row of :meth:`HistoryStore.alerts` shows when it cleared: ``holds``, its local time, and for one
    closed as stale (no monitor worker confirmed it: the one that held it crashed) ``(stale)``, for one closed as the
    device's key was revoked ``(revoked)``: how the report and ``edgekit history alerts`` show it."""
    if row["cleared_at"] is None:
        return "holds"
    why = row.get("cleared_why")
    return local_time(row["cleared_at"]) + (f" ({why})" if why in (CLEARED_STALE, CLEARED_REVOKED) else "")


def alert_kind_text(row: dict[str, Any]) -> str:
    """Return a row of :meth:`HistoryStore.alerts`'s kind, with its subject when it has one (``constraints int8``)."""
    return f"{row['kind']} {row['subject']}" if row.get("subject") else row["kind"]


def _alerts_table(store: HistoryStore) -> tuple[str, int]:
    """Return the page's table (HTML) of the alerts that hold (the :data:`MAX_OPEN_ALERTS` newest) and the
    :data:`UNSHOWN_ROWS` newest cleared ones, or "" when the history holds none, and how many hold (all of them,
    however many are listed). An alert's detail
    may quote a device's text: every cell is escaped and cut. Raises HistoryError."""
    held = store.alerts(holds=True, limit=MAX_OPEN_ALERTS)
    cleared = store.alerts(holds=False, limit=UNSHOWN_ROWS)
    if not held and not cleared:
        return "", 0
    holding = len(store.open_alert_keys())  # all of them (a device's per kind and subject), not only those listed
    part = ("<h2>Alerts</h2><p class=note>The monitor's alerts, each over an episode (offline, a variant breaking the "
            "constraints, drift, low disk, silence, over its ingest budget): the "
            f"{holding:,} that hold now"
            + (f" (the {MAX_OPEN_ALERTS} newest listed)" if holding > len(held) else "")
            + f", then the {UNSHOWN_ROWS} newest cleared. <code>edgekit history alerts</code> lists them by device and "
            "time. Times are this host's clock when the monitor raised and cleared them; <i>stale</i>: closed because "
            "no monitor worker confirmed it (the one that held it stopped without closing it).</p>"
            "<table><tr><th>raised</th><th>cleared</th><th>device</th><th>kind</th><th>detail</th></tr>"
            + "".join(f"<tr><td>{local_time(r['raised_at'])}</td><td>"
                      + ("<span class=bad>holds</span>" if r["cleared_at"] is None else alert_cleared_text(r))
                      + f"</td><td>{_cell(r['device'])}</td><td>{_cell(alert_kind_text(r))}</td>"
                      f"<td>{_cell(r['detail'], MAX_REASON_CHARS)}</td></tr>" for r in held + cleared)
            + "</table>")
    return part, holding


MAX_ROLLOUTS = 20  # the newest rollouts the report lists (edgekit rollout list --limit N lists more)


def rollout_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one summary per rollout of ``rows`` (:meth:`~edge_kit.telemetry.store.HistoryStore.rollouts`): ``id``,
    ``state``, ``created``, ``owner``, ``devices`` (how many it targets), ``variant`` (None: each profile's) and
    ``outcome`` (its state, reason and counts per device state, once it ended). Raises nothing."""
    return [{"id": r["id"], "state": r["state"], "created": r["created"], "owner": r["owner"],
             "devices": len(r["body"].get("targets", {})), "variant": r["body"].get("variant"),
             "model": r["body"].get("model"), "outcome": r["body"].get("outcome")} for r in rows]


def outcome_counts_text(summary: dict[str, Any]) -> str:
    """Return a rollout summary's (:func:`rollout_summaries`) device counts per state as ``done 3, failed 1``, or
    ``-`` before it ended. Raises nothing."""
    counts = (summary.get("outcome") or {}).get("counts") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _rollouts_table(store: HistoryStore) -> tuple[str, int]:
    """Return the report's section on the history's rollouts (the :data:`MAX_ROLLOUTS` newest) and how many there
    are; ``""`` and 0 when it holds none. Raises HistoryError."""
    total = store.count("rollouts")
    if not total:
        return "", 0
    rows = rollout_summaries(store.rollouts(limit=MAX_ROLLOUTS))
    return ("<h2>Rollouts</h2><p class=note>The pull rollouts in the history, newest first"
            + (f" (the {MAX_ROLLOUTS} newest of {total:,})" if total > len(rows) else "")
            + ": when each started (this host's clock), its state and, once it ended, how many devices ended in each "
            "state. <code>edgekit rollout status ID</code> gives each device's row.</p>"
            "<table><tr><th>id</th><th>started</th><th>state</th><th>model</th><th>variant</th><th>devices</th>"
            "<th>outcome</th></tr>"
            + "".join(f"<tr><td>{_cell(r['id'])}</td><td>{local_time(r['created'])}</td><td>{_cell(r['state'])}</td>"
                      f"<td>{_cell(r['model'] or '-')}</td><td>{_cell(r['variant'] or 'per profile')}</td>"
                      f"<td>{r['devices']:,}</td><td>{_cell(outcome_counts_text(r))}</td></tr>" for r in rows)
            + "</table>"), total


def _check_replaceable(out: Path) -> None:
    """Raise InputError when ``out`` is an existing file that is not an HTML page (``--out`` naming the history
    database or the fleet file would have replaced it with the report), or something other than a file (a folder, a
    device such as /dev/null, which the report's rename would have replaced for a root user, a FIFO, which reading
    would have waited on forever); return nothing otherwise."""
    try:
        mode = out.stat().st_mode
    except OSError:
        mode = None  # nothing there (or nothing this user may look at): the write says why
    if mode is not None and not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):  # suggest a file in it only where one can be written (not in /proc, nor read-only)
            try:
                writable_folder(out)
            except InputError:
                raise InputError(f"{out}: a folder, and not one a file can be written in; give --out the report's file "
                                 "in a folder you can write to") from None
            try:
                _check_replaceable(out / "report.html")  # the suggestion itself must not be refused in turn
            except InputError:
                raise InputError(f"{out}: a folder; give --out the report's file (a new .html file)") from None
            raise InputError(f"{out}: a folder; give --out the report's file, e.g. {out / 'report.html'}")
        raise InputError(f"{out}: not a regular file (a device, a FIFO or a socket); choose another --out")
    try:
        with open(out, "rb") as f:
            head = f.read(64).lstrip().lower()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return  # nothing there to lose (a folder is refused when the report is written)
    except OSError:
        return  # unreadable: the write says why
    if head and not head.startswith((b"<!doctype html", b"<html")):
        raise InputError(f"{out}: exists and is not an HTML report (a history, a fleet file?); a report never "
                         "replaces it: choose another --out")


def build_report(store: HistoryStore, out: Path, title: str = "edge-kit fleet report",
                 profiles: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the report to ``out`` (atomically); return what it holds (profiles, devices, plots, records plotted,
    flagged devices, ``not_plotted``: ``{device: records}`` of devices naming more variants than
    :data:`MAX_VARIANTS_PER_DEVICE`, ``rows``: the fleet table's figures, labelled ``bench`` or ``live``,
    :func:`figure_rows`, and ``refused`` and ``gaps``: the messages the monitor refused and the sequence gaps it
    recorded, which no figure shows: the page counts them and lists the :data:`UNSHOWN_ROWS` newest of each;
    ``alerts_holding``: the monitor's alerts that hold, which the page lists with the newest cleared ones;
    ``rollouts``: how many rollouts the history holds, the :data:`MAX_ROLLOUTS` newest listed; ``devices``: the fleet
    table's rows, one per device any table of the history names, benchmarked or not).

    ``profiles``: the fleet file's profile of each device it names (``{device: profile}``), which places that
    device's records; a device it does not name is placed by what its records say.

    Raises:
        InputError: ``out`` is a file other than an HTML page (the history itself, the fleet file: a report
            never replaces them), or cannot be written (its folder is missing or read-only, the disk is full).
        HistoryError: the history cannot be read.
    """
    import plotly.offline

    _check_replaceable(Path(out))
    newest = Newest.read(store)  # once: the plots, the fleet table, the note and --json show the same messages
    latest, left_out = bounded_variants(list(newest.bench.values()))
    decisions = {dev: d.get("chosen_sha256") for dev, d in newest.decisions.items()}
    running = {dev: m["current"].get("sha256") for dev, m in newest.status.items() if isinstance(m.get("current"), dict)}
    chosen = {dev: decisions.get(dev) or running.get(dev) for dev in {r["device"] for r in latest}}
    by_profile: dict[str, list[dict[str, Any]]] = defaultdict(list)
    profiles = profiles or {}
    for r in latest:
        profile = profiles.get(r["device"]) or r.get("profile")  # else the device's word, any JSON: only text names one
        by_profile[profile if isinstance(profile, str) and profile else "unknown"].append(r)
    sections, plots = [], 0
    known = set(bundled_profiles())
    for name in sorted(by_profile):
        # A record's profile is the device's word: a bundled name, never a path on this host (a FIFO would
        # hang the report, /dev/zero fill its memory, any YAML file be read into it).
        if name not in known:
            continue
        try:
            profile = load_profile(name)
        except Exception:  # noqa: BLE001 - a record from a profile this host does not know
            continue
        figs = _profile_figures(profile, by_profile[name], chosen)
        plots += len(figs)
        devices = sorted({r["device"] for r in by_profile[name]})
        sections.append(f"<h2>{html.escape(name)}</h2><p class=note>{html.escape(profile.description)}; devices: "
                        f"{html.escape(', '.join(devices))}</p>"
                        + "".join(f.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}) for f in figs))
    head, rows = _fleet_rows(newest, profiles, store.devices())
    table = ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    gate_rows, gate_clocks = _gate_rows(store)
    if gate_rows:
        gate_head = ["when", "canary", "candidate", "action", "why", "p50 ms canary / control", "requests canary / control",
                     "p (Mann-Whitney U) on devices' medians or pooled requests", "live SNR dB", "controls"]
        table += ("<h2>Rollout gate decisions</h2><p class=note>Live figures: the serving API's service times on the "
                  f"devices' own traffic (clock: {html.escape('; '.join(gate_clocks) or 'not recorded')}), canaries on the candidate "
                  "against controls on the current model; "
                  "the test is on each device's median (on pooled requests only when too few devices, an optimistic p); "
                  "SNR from shadow runs against the fp32 reference.</p><table><tr>"
                  + "".join(f"<th>{h}</th>" for h in gate_head) + "</tr>"
                  + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in gate_rows) + "</table>")
    fleet_decisions = store.latest_decisions((FLEET_KIND,))
    fleet_rows = _fleet_selection_rows(fleet_decisions)
    flagged = flagged_devices(fleet_decisions)
    if fleet_rows:
        fleet_head = ["device", "chosen", "confidence", "measured on the device", "inferred from its profile",
                      "differs from its profile", "drift"]
        table += ("<h2>Fleet selection: measured and inferred figures</h2><p class=note>Decisions of <code>tune "
                  "--budget</code>: each variant's figures were either measured on the device or inferred from its "
                  "profile by the fleet model (90 % interval of one measurement); a device is only switched with a "
                  "health benchmark of the variant it switches to. Flagged devices are measured individually.</p>"
                  "<table><tr>" + "".join(f"<th>{h}</th>" for h in fleet_head) + "</tr>"
                  + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in fleet_rows) + "</table>")
    refused, gaps = store.count("invalid"), store.count("gaps")  # what the figures above do not show
    alerts, holding = _alerts_table(store)
    rollouts, rollout_count = _rollouts_table(store)
    table += rollouts + alerts + _unshown_tables(store, refused, gaps)
    simulated = any(r.get("simulated") for r in latest)
    served = live_clocks(newest.live)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=note>Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {html.escape(store.where)}: "
            f"{len(latest)} latest benchmark records. Latency is measured on each device with "
            f"{html.escape('; '.join(latency_clocks(latest)) or 'no clock (no records)')}; accuracy on the eval set "
            "shipped with the artifacts; energy per inference comes from "
            "the power sensor named in the legend, or is an estimate from the profile's idle/busy watts and CPU use."
            + (f" Live p50/p99 are each device's serving API's service times over its last requests, measured there "
               f"with {html.escape('; '.join(served))}." if served else "")
            + (" Some devices are simulated: their figures are measurements of the simulating machine." if simulated else "")
            + "".join(f" {html.escape(device)}: {n:,} benchmark record(s) of more than {MAX_VARIANTS_PER_DEVICE} variant "
                      "names not plotted (its newest names are)." for device, n in sorted(left_out.items()))
            + (f" Not in these figures: {refused:,} message(s) the monitor refused (forged, malformed or over a limit; "
               f"kept in the history's invalid table) and {gaps:,} sequence gap(s) (records a device numbered that "
               "never arrived; its gaps table)." if refused or gaps else "")
            + "</p>" + "".join(sections) + f"<h2>Fleet</h2>{table}</body></html>")
    # A lone surrogate has no UTF-8 form (decode refuses them; a history row may still hold one): shown as \udXXX.
    page = page.encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        atomic_write_text(Path(out), page)
    except OSError as exc:
        raise InputError(f"{out}: cannot write the report there ({exc.strerror or exc}); "
                         "pass --out a file in a writable folder") from None
    return {"out": str(out), "profiles": sorted(by_profile), "devices": len(rows), "plots": plots, "records": len(latest),
            "flagged": flagged, "not_plotted": left_out, "rows": figure_rows(newest), "refused": refused, "gaps": gaps,
            "alerts_holding": holding, "rollouts": rollout_count}
