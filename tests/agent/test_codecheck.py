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


def test_tree_lists_each_kind_of_entry_from_its_folders_listing_without_a_stat_per_file(tmp_path, monkeypatch):
    """tree() runs at every agent start and in every deploy's probe: the types come from each folder's listing, with
    no stat or lstat per file (os.walk with islink and isfile made two), and what it lists is unchanged: files by
    sha256 at any depth, links by their target (a linked folder is not entered), a FIFO as not a regular file, the
    top folder's manifest left out (a nested one is code like any other)."""
    import hashlib
    import os

    code = tmp_path / "agent"
    (code / "pkg" / "sub").mkdir(parents=True)
    (code / "pkg" / "a.py").write_bytes(b"A = 1\n")
    (code / "pkg" / "sub" / "big.py").write_bytes(b"x" * 200_000)  # more than one read of the buffer
    (code / "pkg" / codecheck.MANIFEST).write_text("{}")
    (code / codecheck.MANIFEST).write_text("{}")
    (code / "link.py").symlink_to("pkg/a.py")
    (code / "linked").symlink_to("pkg")
    (code / "gone.py").symlink_to("nowhere.py")
    os.mkfifo(code / "pkg" / "fifo.py")
    stats = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, **k: stats.append(a[0]) or _real(*a, **k))
    listed = codecheck.tree(code)
    monkeypatch.undo()
    assert stats == []
    assert listed == {
        "gone.py": "symlink:nowhere.py", "link.py": "symlink:pkg/a.py", "linked": "symlink:pkg",
        f"pkg/{codecheck.MANIFEST}": hashlib.sha256(b"{}").hexdigest(),
        "pkg/a.py": hashlib.sha256(b"A = 1\n").hexdigest(), "pkg/fifo.py": "not a regular file",
        "pkg/sub/big.py": hashlib.sha256(b"x" * 200_000).hexdigest(),
    }
    assert list(listed) == sorted(listed)


@pytest.mark.parametrize("swap, listed", [
    (lambda path: path.symlink_to("/dev/zero"), "symlink:/dev/zero"),
    (lambda path: path.symlink_to("../../operators.json"), "symlink:../../operators.json"),  # a file out of the code
    (lambda path: __import__("os").mkfifo(path), "not a regular file"),
], ids=["link to /dev/zero", "link out of the code", "FIFO"])
def test_a_file_replaced_after_its_folder_was_listed_is_listed_as_what_it_is_now_never_followed(deployed, monkeypatch,
                                                                                                swap, listed):
    """tree() takes each entry's type from its folder's listing, then opens the files: one swapped for a link or a
    FIFO meanwhile was opened as a file all the same, so the link was followed (the hash of a file outside the code,
    or /dev/zero read for ever) and the FIFO waited for a writer, holding the agent's start and the deploy's probe."""
    import contextlib
    import os
    import threading

    code = deployed[0]
    listed_before = os.scandir

    def scandir_then_swap(path):
        with listed_before(path) as listing:
            entries = list(listing)
        if os.fspath(path) == os.fspath(code / "pkg"):
            (code / "pkg" / "a.py").unlink()
            swap(code / "pkg" / "a.py")
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_swap)
    got = []
    t = threading.Thread(target=lambda: got.append(codecheck.tree(code)), daemon=True)
    t.start()
    t.join(10)
    assert got, "the check followed the link or waited on the FIFO"
    assert got[0]["pkg/a.py"] == listed
