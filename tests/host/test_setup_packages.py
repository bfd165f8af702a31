"""`.ci/setup` installs every Debian package whose programs the code and the tests run by name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The package each program comes from on Debian (dpkg -S).
PACKAGE = {"mosquitto": "mosquitto", "mosquitto_passwd": "mosquitto", "sshd": "openssh-server", "ssh-keygen": "openssh-client",
           "chromium": "chromium", "unshare": "util-linux", "nsenter": "util-linux", "ip": "iproute2", "tc": "iproute2",
           "nginx": "nginx-light", "initdb": "postgresql", "postgres": "postgresql", "pg_ctl": "postgresql",
           "pgrep": "procps", "kill": "procps"}
# Not for .ci/setup: on every Debian (essential packages, or git, which cloned the repository), another name of one
# above, or only on a real device (and optional there).
ELSEWHERE = {"/bin/sh", "sh", "sleep", "sha256sum", "mount", "umount", "git", "python", "chromium-browser",
             "vcgencmd", "nvpmodel", "nvidia-smi", "jetson_clocks", "tegrastats", "edgetpu_compiler"}
CALL = re.compile(r"(?:subprocess\.(?:run|Popen|check_output|check_call)|shutil\.which)\(\[?\"([A-Za-z_0-9./-]+)\"")


def setup_packages() -> set[str]:
    text = (ROOT / ".ci" / "setup").read_text()
    loop = re.search(r"for pkg in (.*?); do", text, re.S)
    assert loop, ".ci/setup: its apt package loop moved; update this test"
    return set(loop.group(1).replace("\\\n", " ").split())


def test_every_program_run_by_name_comes_from_a_package_ci_setup_installs():
    """pgrep (procps) is run by the integration tests and was not installed: Debian's container images leave it out."""
    programs: dict[str, str] = {}
    for folder in ("edge_kit", "device_agents", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in CALL.findall(path.read_text()):
                programs.setdefault(name, str(path.relative_to(ROOT)))
    assert "mosquitto" in programs and "pgrep" in programs  # the scan sees what it should
    unknown = {p: where for p, where in programs.items() if p not in PACKAGE and p not in ELSEWHERE}
    assert unknown == {}, "say which Debian package each comes from (PACKAGE) or why none is needed (ELSEWHERE)"
    missing = {p: PACKAGE[p] for p in programs if p in PACKAGE and PACKAGE[p] not in setup_packages()}
    assert missing == {}, f".ci/setup does not install the packages of: {missing}"
