"""Benchmarks measure the figures the documentation shows. Run: .venv/bin/python -m pytest benchmarks -q

Each figure is recorded with what it measured and how (the ``figure`` fixture). At the end of the run
the table prints, and the figures are written as JSON for the docs' Figures page
(``docs/hooks/figures.py`` renders it; nobody edits the numbers by hand):

- a **full run** (every file under ``benchmarks/``, nothing deselected, every test reported) writes
  ``docs/figures.json``;
- a partial run (one file, ``-k``, ``-m``, ``-x`` stopping early, ...) writes nothing unless
  ``--figures-out PATH`` is given; the JSON then says ``"full": false`` and the page says so.

A run that recorded no figure writes nothing. The JSON also holds the run's date, the pytest
arguments, the git commit, the machine (CPU model, cores, memory, Python, OS), a few package
versions and each test's outcome, so every number says where it came from.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = Path("docs") / "figures.json"  # relative to the repository root
REPRODUCE = ".venv/bin/python -m pytest benchmarks -q"
PACKAGES = ("numpy", "ai-edge-litert", "tensorflow", "tensorflow-cpu", "paho-mqtt", "paramiko", "pytest-benchmark")

FIGURES: list[dict[str, str]] = []
_RUN: dict[str, object] = {"started": None, "t0": 0.0, "git": None, "deselected": 0, "outcomes": {}, "skips": {},
                           "wrote": None}


def pytest_addoption(parser):
    parser.addoption("--figures-out", metavar="PATH", default=None,
                     help="write the recorded figures as JSON to PATH, even for a partial run "
                          "(a full run writes docs/figures.json without it)")



@pytest.fixture
def figure(request):
    """record(name, value, target, how): add one row to the figures table."""
    module = request.node.module

    def record(name: str, value: str, target: str, how: str) -> None:
        doc = (module.__doc__ or "").strip()
        FIGURES.append({
            "name": name, "value": value, "target": target, "how": how,
            "group": doc.split(":", 1)[0].strip() if ":" in doc.split("\n", 1)[0] else Path(module.__file__).stem,
            "test": request.node.originalname or request.node.name,
            "file": Path(module.__file__).name,
        })

    return record


def pytest_sessionstart(session):
    _RUN["started"] = datetime.now(timezone.utc)
    _RUN["t0"] = time.perf_counter()
    _RUN["git"] = _git_state(Path(session.config.rootpath))  # the code that runs: read before any test does


def pytest_deselected(items):
    _RUN["deselected"] = int(_RUN["deselected"]) + len(items)


def pytest_runtest_logreport(report):
    outcomes: dict[str, str] = _RUN["outcomes"]  # type: ignore[assignment]
    if report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.skipped:
        outcomes[report.nodeid] = "skipped"
        if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            _RUN["skips"][report.nodeid] = str(report.longrepr[2]).removeprefix("Skipped: ")  # type: ignore[index]
    elif report.when == "call":
        outcomes.setdefault(report.nodeid, "passed")


def _full_run(session) -> bool:
    """True when the session ran every test of every benchmark file, with nothing deselected."""
    files = {p.name for p in BENCH_DIR.glob("test_*.py")}
    items = session.items
    ran = {Path(str(item.path)).name for item in items if Path(str(item.path)).parent == BENCH_DIR}
    outcomes: dict[str, str] = _RUN["outcomes"]  # type: ignore[assignment]
    return (bool(items) and ran == files and _RUN["deselected"] == 0 and len(ran) == len({str(i.path) for i in items})
            and all(item.nodeid in outcomes for item in items))


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_state(root: Path) -> dict[str, object]:
    """The commit checked out, and whether tracked files differ from it (docs/figures.json aside)."""
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", f":!{DEFAULT_OUT.as_posix()}")
    return {"commit": _git(root, "rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _machine() -> dict[str, object]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gb": _memory_gb(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}"}


def _packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    if not FIGURES:
        return
    config = session.config
    root = Path(config.rootpath)
    full = _full_run(session)
    given = config.getoption("--figures-out")
    if given is None and not full:
        _RUN["wrote"] = "not written: a partial run (pass --figures-out PATH to write its figures)"
        return
    out = Path(given) if given is not None else root / DEFAULT_OUT
    outcomes: dict[str, str] = _RUN["outcomes"]  # type: ignore[assignment]
    data = {
        "schema": "edgekit.figures/1",
        "date": _RUN["started"].isoformat(timespec="seconds") if _RUN["started"] else None,  # type: ignore[union-attr]
        "duration_s": round(time.perf_counter() - float(_RUN["t0"]), 1),
        "full": full,
        "command": shlex.join(["python", "-m", "pytest", *config.invocation_params.args]),
        "pytest_args": list(config.invocation_params.args),
        "reproduce": REPRODUCE,
        "git": _RUN["git"] or _git_state(root),
        "machine": _machine(),
        "packages": _packages(),
        "tests": {state: sorted(n for n, s in outcomes.items() if s == state) for state in ("passed", "failed", "skipped")},
        "skip_reasons": dict(_RUN["skips"]),  # type: ignore[arg-type]
        "figures": FIGURES,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    _RUN["wrote"] = f"wrote {out} ({'full run' if full else 'partial run'}, {len(FIGURES)} figures)"


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("edge-kit figures (docs/figures.json, the docs' Figures page)")
    for f in FIGURES:
        terminalreporter.write_line(f"{f['name']:<58} {f['value']:>12}   target {f['target']:<10} [{f['how']}]")
    if _RUN["wrote"]:
        terminalreporter.write_line(str(_RUN["wrote"]))

