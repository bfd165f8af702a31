"""The agent's code check: every file hashed against the operator-signed manifest; no marker file."""

from __future__ import annotations

import json

import pytest

from device_agents import codecheck
from device_agents.errors import CodeTampered
from device_agents.identity import Signer, encode_key


@pytest.fixture
def deployed(tmp_path):
    code = tmp_path / "agent"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "a.py").write_text("A = 1\n")
    (code / "pkg" / "b.py").write_text("B = 2\n")
    operator = Signer.generate()
    signed = operator.sign(codecheck.code_manifest(codecheck.tree(code), "f" * 64))
    (code / codecheck.MANIFEST).write_text(json.dumps(signed))
    operators = tmp_path / "operators.json"
    operators.write_text(json.dumps([encode_key(operator.public)]))
    return code, operators, operator


def test_untouched_code_verifies(deployed):
    code, operators, _ = deployed
    assert codecheck.verify_code(code, operators)["bundle"] == "f" * 64


@pytest.mark.parametrize("tamper, phrase", [
    (lambda c: (c / "pkg" / "a.py").write_text("A = 666\n"), "changed pkg/a.py"),
    (lambda c: (c / "pkg" / "b.py").unlink(), "removed pkg/b.py"),
    (lambda c: ((c / "pkg" / "__pycache__").mkdir(), (c / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x")),
     "added pkg/__pycache__/a.pyc"),
    (lambda c: (c / "sitecustomize.py").symlink_to("/tmp/evil.py"), "added sitecustomize.py"),
])
def test_a_changed_added_or_removed_file_is_named_and_refused(deployed, tamper, phrase):
    code, operators, _ = deployed
    tamper(code)
    with pytest.raises(CodeTampered, match=phrase):
        codecheck.verify_code(code, operators)


def test_a_manifest_rewritten_to_match_tampered_code_fails_its_signature(deployed):
    code, operators, _ = deployed
    (code / "pkg" / "a.py").write_text("A = 666\n")
    doc = json.loads((code / codecheck.MANIFEST).read_text())
    doc["files"] = codecheck.tree(code)  # the attacker updates the hashes but cannot sign
    (code / codecheck.MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(CodeTampered, match="signature does not verify"):
        codecheck.verify_code(code, operators)
    (code / codecheck.MANIFEST).write_text(json.dumps(Signer.generate().sign(doc)))  # signed by someone else
    with pytest.raises(CodeTampered, match="not operator's registered key"):
        codecheck.verify_code(code, operators)


def test_no_manifest_or_garbage_is_refused_with_what_to_do(deployed):
    code, operators, _ = deployed
    (code / codecheck.MANIFEST).write_text("{not json")
    with pytest.raises(CodeTampered, match="run `edgekit deploy` to reinstall it"):
        codecheck.verify_code(code, operators)
    (code / codecheck.MANIFEST).unlink()
    with pytest.raises(CodeTampered, match="No such file"):
        codecheck.verify_code(code, operators)


def test_a_deployed_config_refuses_to_run_code_from_anywhere_but_root_agent(tmp_path):
    """verify_code (written by the deploy): code found elsewhere first on sys.path (a planted package
    in the working directory) does not start, even though it is not the folder the check would hash."""
    from device_agents.__main__ import check_own_code

    check_own_code(tmp_path)  # not deployed, not required: runs from the source tree as before
    with pytest.raises(CodeTampered, match=r"runs from .*, not from the deployed .*agent; not started"):
        check_own_code(tmp_path, required=True)


def test_a_fifo_in_the_code_is_an_added_file_not_a_check_that_waits_for_a_writer(deployed):
    """tree() opened every file to hash it: a FIFO planted among the agent's code held the agent's start (and the
    deploy's probe, which runs tree() on the device, until its deadline, so no deploy could reinstall the code)."""
    import os
    import threading

    code, operators, _ = deployed
    os.mkfifo(code / "pkg" / "c.py")
    got = []

    def check():
        try:
            codecheck.verify_code(code, operators)
        except CodeTampered as exc:
            got.append(str(exc))

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(10)
    assert got and "added pkg/c.py" in got[0], "the check waited on the FIFO"
    assert codecheck.tree(code)["pkg/c.py"] == "not a regular file"
