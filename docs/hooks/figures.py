"""MkDocs hook: render the Figures page from ``docs/figures.json``.

The benchmarks (``benchmarks/conftest.py``) write ``docs/figures.json`` at the end of a run; this
hook replaces the ``<!-- figures -->`` marker in ``docs/figures.md`` with the run's provenance
(date, commit, machine, command) and one table per group of figures. Nobody types a number into
the page. A missing or unreadable ``figures.json`` gives a page that says so, not a failed build.
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.figures")

PAGE = "figures.md"
SOURCE = "figures.json"
MARKER = "<!-- figures -->"
REPRODUCE = ".venv/bin/python -m pytest benchmarks -q"
SPLIT_ABOVE = 8  # a group with more figures than this gets one table per benchmark test

_NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?"


_ONE = re.compile(r"<!-- figure: (.+?) -->")  # one figure's value, inline on any page


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **_: Any) -> str:
    """Return the page with each ``<!-- figure: NAME -->`` replaced by that figure's value, and on the
    Figures page the marker replaced by every table."""
    if _ONE.search(markdown):
        markdown = _ONE.sub(lambda m: inline(Path(config["docs_dir"]) / SOURCE, m.group(1).strip()), markdown)
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        log.warning("%s has no %s marker: the figures tables have nowhere to go", PAGE, MARKER)
        return markdown
    return markdown.replace(MARKER, render(Path(config["docs_dir"]) / SOURCE))


def inline(path: Path, name: str) -> str:
    """Return the value of the figure ``name`` in ``path`` as inline Markdown (with where it came from), or a
    note that the current figures run has not measured it."""
    try:
        figures = json.loads(path.read_text())["figures"]
        data_date = json.loads(path.read_text()).get("date", "?")
    except (OSError, ValueError, KeyError, TypeError):
        figures, data_date = [], "?"
    for f in figures if isinstance(figures, list) else []:
        if isinstance(f, dict) and f.get("name") == name:
            return f"**{_esc(f.get('value', '?'))}** (run of {_esc(str(data_date)[:10])}, [Figures](figures.md))"
    log.info("figure %r is not in %s: the page says so", name, path)
    return f"*not in the current `docs/{SOURCE}` yet: the next full benchmark run measures it ([Figures](figures.md))*"


def render(path: Path) -> str:
    """Return the Markdown for the figures in ``path`` (or a note saying why there are none)."""
    if not path.is_file():
        log.info("%s not found: the Figures page says so", path)
        return (f'!!! warning "No figures yet"\n    `docs/{SOURCE}` is missing, so there is nothing to show. '
                f"Run `{REPRODUCE}` (a full run writes it), then rebuild the docs.\n")
    try:
        data = json.loads(path.read_text())
        figures = data["figures"]
        if not isinstance(figures, list):
            raise TypeError("'figures' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("%s unreadable: %s", path, exc)
        return (f'!!! warning "Figures unreadable"\n    `docs/{SOURCE}` could not be read ({_esc(str(exc))}). '
                f"Run `{REPRODUCE}` again to rewrite it.\n")
    return "\n".join([_provenance(data), _outcomes(data), _tables(figures)])


def _esc(text: Any) -> str:
    """Escape text for a Markdown table cell."""
    out = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_|\[\]])", r"\\\1", out)


def _provenance(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    git = data.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12]
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    date = str(data.get("date") or "unknown").replace("T", " ").replace("+00:00", " UTC")
    cores = m.get("cores")
    if m.get("usable_cores") not in (None, cores):
        cores = f"{cores} ({m['usable_cores']} usable)"
    rows = [
        ("date", date),
        ("command run", f"`{data.get('command', '?')}`"),
        ("duration", f"{data['duration_s']:.0f} s" if isinstance(data.get("duration_s"), (int, float)) else "?"),
        ("git commit", f"`{commit}`"),
        ("CPU", f"{_esc(m.get('cpu', '?'))} ({_esc(m.get('arch', '?'))})"),
        ("cores", _esc(cores if cores is not None else "?")),
        ("memory", f"{m['memory_gb']} GB" if m.get("memory_gb") else "?"),
        ("Python", _esc(m.get("python", "?"))),
        ("OS", _esc(m.get("os", "?"))),
    ]
    if data.get("packages"):
        rows.append(("packages", ", ".join(f"{_esc(k)} {_esc(v)}" for k, v in data["packages"].items())))
    lines = []
    if not data.get("full", False):
        lines += ['!!! note "Partial run"',
                  f"    These figures come from a partial benchmark run (`{data.get('command', '?')}`), not the "
                  f"whole suite. The full run, `{data.get('reproduce', REPRODUCE)}`, replaces them.", ""]
    lines += [f"Reproduce on your machine: `{data.get('reproduce', REPRODUCE)}` (a full run rewrites "
              f"`docs/{SOURCE}`; the raw data of this page: [{SOURCE}]({SOURCE})).", "",
              "| run | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _outcomes(data: dict[str, Any]) -> str:
    tests = data.get("tests") or {}
    reasons = data.get("skip_reasons") or {}
    lines = []
    for state in ("failed", "skipped"):
        for nodeid in tests.get(state) or []:
            why = f": {_esc(reasons[nodeid])}" if nodeid in reasons else ""
            lines.append(f"- `{nodeid}` {state}{why}")
    if not lines:
        return ""
    return '!!! warning "Not every benchmark ran"\n' + "\n".join("    " + line for line in lines) + "\n"


def _met(value: str, target: str) -> str:
    """'met' / 'not met' when both value and target are plain numeric forms, else ''."""
    v = re.fullmatch(rf"\s*({_NUMBER})\s*%?\s*", value)
    if not v:
        return ""
    x = float(v.group(1).replace(",", ""))
    t = target.strip()
    rng = re.fullmatch(rf"({_NUMBER})\s*-\s*({_NUMBER})", t)
    if rng:
        lo, hi = (float(g.replace(",", "")) for g in rng.groups())
        ok = lo <= x <= hi
    else:
        cmp = re.fullmatch(rf"(<=|>=|<|>)\s*({_NUMBER})", t)
        if not cmp:
            return ""
        y = float(cmp.group(2).replace(",", ""))
        ok = {"<=": x <= y, ">=": x >= y, "<": x < y, ">": x > y}[cmp.group(1)]
    return "yes" if ok else "**no**"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| figure | value | target | met | how measured |", "|---|---|---|---|---|"]
    for f in rows:
        value, target = str(f.get("value", "")), str(f.get("target", ""))
        lines.append(f"| {_esc(f.get('name', '?'))} | {_esc(value)} | {_esc(target)} | {_met(value, target)} "
                     f"| {_esc(f.get('how', ''))} |")
    return "\n".join(lines) + "\n"


def _title(test: str) -> str:
    words = test.removeprefix("test_").replace("_", " ")
    return words[:1].upper() + words[1:]


def _tables(figures: list[dict[str, Any]]) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in figures:
        groups.setdefault(str(f.get("group") or f.get("file") or "Figures"), []).append(f)
    out = []
    for title, rows in groups.items():
        out.append(f"## {_esc(title)}\n")
        if len(rows) <= SPLIT_ABOVE:
            out.append(_table(rows))
            continue
        by_test: dict[str, list[dict[str, Any]]] = {}
        for f in rows:
            by_test.setdefault(str(f.get("test") or "other"), []).append(f)
        for test, sub in by_test.items():
            out.append(f"### {_esc(_title(test))}\n")
            out.append(_table(sub))
    return "\n".join(out)
