"""How the CLI prints: every [n] in a compile table row points at its note; piped tables are not cut."""

import os
import re
import subprocess
import sys

from rich.console import Console

from edge_kit.cli.compile import _compile_report
from edge_kit.manifest import Artifact, Manifest


def built(vid, **kw):
    return Artifact(id=vid, status="built", profiles=["p"], summary="", precision="int8", bytes=100, gzip_bytes=90,
                    sparsity=0.0, macs=10, **kw)


def test_footnote_numbers_match_their_rows_when_a_fallback_comes_first():
    fallback = {"edgetpu": {"method": "rule-check", "ops_total": 3, "ops_mapped": 1,
                            "first_fallback": {"index": 1, "op": "SIN", "reason": "SIN is not an Edge TPU op"}}}
    m = Manifest(created="now", model={"name": "m"}, versions={}, profiles={},
                 artifacts=[built("fp32", accelerators=fallback),
                            Artifact(id="edgetpu", status="not-built", reason="no compiler", profiles=["p"],
                                     summary="", precision="int8")])
    table, lines = _compile_report(m)
    console = Console(width=200, record=True)
    console.print(table)
    rendered = console.export_text()
    assert "(CPU from SIN, see [1])" in rendered and "not-built, see [2]" in rendered
    footnotes = {int(n): text for n, text in (re.match(r"\[(\d+)\] (.*)", ln).groups() for ln in lines if ln.startswith("["))}
    assert footnotes[1].startswith("fp32: the Edge TPU hands over to the CPU at op #1 SIN")
    assert footnotes[2] == "edgetpu not-built: no compiler"


def test_piped_output_is_wide_enough_for_the_tables_unless_columns_says_otherwise():
    probe = "from edge_kit.cli.app import out; print(out.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert piped.stdout.strip() == "120"
    narrow = subprocess.run([sys.executable, "-c", probe], env={**env, "COLUMNS": "60"}, capture_output=True, text=True,
                            timeout=60, check=True)
    assert narrow.stdout.strip() == "60"
