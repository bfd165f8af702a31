"""Both programs' standard output, when it cannot be written (edgekit_protocol.errors.watched_stdout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[2]
CASES = {  # id: (program, arguments; the json-error case names a profile or store that is not there)
    "edgekit-table": ("edgekit", ("profiles", "list")),
    "edgekit-json": ("edgekit", ("profiles", "list", "--json")),
    "edgekit-json-error": ("edgekit", ("profiles", "show", "rpi-4", "--json")),
    "agent-state": ("edgekit-agent", ("state", "--root", "{root}")),
    "agent-json-error": ("edgekit-agent", ("state", "--json", "--root", "{typo}")),
    "agent-help": ("edgekit-agent", ("--help",)),
}
MAINS = {"edgekit": "edge_kit.cli", "edgekit-agent": "device_agents.__main__"}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_output_that_cannot_be_written_is_one_line_naming_standard_output(tmp_path, case, stdout):
    """`edgekit profiles list > /dev/full` (a full disk) ended in an OSError traceback, `... >&-` in an AttributeError
    one ('NoneType' object has no attribute 'isatty'), and `edgekit-agent --help > /dev/full` exited 0 with no output.
    Now one line naming standard output and the error, exit 1; a failure whose error document could not be written
    keeps its line and its exit code (2 here)."""
    prog, args = CASES[case]
    (tmp_path / "root" / "models").mkdir(parents=True)  # an empty store: `state` prints it
    argv = [a.format(root=tmp_path / "root", typo=tmp_path / "typo") for a in args]
    code = f"import sys; sys.argv = [{prog!r}, *{argv!r}]; from {MAINS[prog]} import main; sys.exit(main())"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", code], stdout=full if stdout == "full" else None,
                                stderr=subprocess.PIPE, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(HERE)},
                                preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)
    why = "No space left on device" if stdout == "full" else "Bad file descriptor"
    if case.endswith("json-error") and stdout == "full":  # the error's line, said first on stderr, is all there is
        first = {"edgekit": "unknown profile 'rpi-4'", "edgekit-agent": "no model store at "}[prog]
        assert result.returncode == 2 and result.stderr.startswith(f"{prog}: error: {first}"), result
    else:
        assert result.returncode == 1 and result.stderr.startswith(
            f"{prog}: error: cannot write to standard output ({why}); "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
