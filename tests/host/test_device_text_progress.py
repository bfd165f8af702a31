"""What a device says reaches the operator's terminal through progress lines too: shown, never obeyed.

A canary's live gate reports each device that would not start a shadow run or give its live figures on the deploy's
progress bar, quoting the agent's refusal (an ack's ``error``: any text the device signs). rich reads a progress
description as markup: a ``[/]`` in it stopped the deploy with a traceback (rich's MarkupError) mid-rollout, a
``[link=...]`` made a hyperlink, and an OSC 52 sequence (rich passes ESC through) wrote the operator's clipboard.
The bar is drawn on a terminal only, so the command runs on a pseudo-terminal here.
"""

from __future__ import annotations

OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"
REFUSAL = f"[/][link=https://evil.example]click[/link]{OSC52}"

# The deploy's rollout, faked where it meets the device: the live gate reports a canary whose agent refused the
# shadow command (as edge_kit.loop.rollout does), then the rollout ends.
PRELUDE = f"""
import time
import edge_kit.loop.rollout, edge_kit.manifest
from edge_kit.errors import AgentError
from edge_kit.fleet.deploy import DeviceResult, GroupResult

def rollout(fleet, targets, opts, canary, max_failed, progress, gate=None, record=None):
    refused = AgentError("d1: shadow refused: " + {REFUSAL!r})
    progress("d1", f"no shadow run: {{refused}}")
    time.sleep(0.5)  # the bar is redrawn meanwhile
    return GroupResult([DeviceResult("d1", "succeeded"), DeviceResult("d2", "succeeded")])

edge_kit.loop.rollout.rollout = rollout
edge_kit.manifest.read_manifest = lambda *_a, **_k: None
"""


def test_a_device_refusal_on_the_deploy_progress_bar_is_shown_not_obeyed(tmp_path, on_a_terminal):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: sim\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: edgekit, profile: rpi4}\n"
                     "devices:\n  - {name: d1, host: 127.0.0.1}\n  - {name: d2, host: 127.0.0.1}\n")
    argv = ["edgekit", "deploy", "--fleet", str(fleet), "--artifacts", str(tmp_path), "--canary", "50%",
            "--gate", "live"]
    code, text = on_a_terminal(f"import sys\n{PRELUDE}\nsys.argv = {argv!r}\nfrom edge_kit.cli import main\nmain()",
                               COLUMNS="400")
    assert code == 0, text
    assert "Traceback" not in text and "MarkupError" not in text
    assert "\x1b]52" not in text and "\x1b]8;" not in text  # no clipboard write, no hyperlink
    assert "d1: no shadow run: d1: shadow refused: [/][link=https://evil.example]click[/link]\\x1b]52;c;" in text
