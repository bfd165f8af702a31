"""The agent's own code, checked by content before it runs: never by a marker file.

A deploy unpacks the agent into a folder of its own, ``<root>/agent-<sha12>-<n>/``, points the
symlink ``<root>/agent`` at it, and writes ``AGENT.json`` beside the code:
the sha256 of every file it unpacked, signed by the operator key. Before the agent starts (``run``
and ``supervise``), :func:`verify_code` hashes every file of the version it runs from and refuses to
start (exit 2, one line naming the first file that differs) when a file was changed, added
(a stray ``.pyc`` too: the agent runs with ``-B`` and writes none) or removed, or when the signature
does not verify under the operator keys pinned in ``<root>/identity/operators.json``. The deploy
sends this module's source (with its own probe appended, :data:`edge_kit.fleet.ssh._DEVICE_STATE`) as
the script it runs on the device, so it does not rely on the device's code, and re-installs the agent
when the tree differs.

What this does not do: someone who can write the agent's folder can also rewrite this check; the
deploy's check, run from the host, is the one that such a change cannot hide from. Protecting a
device from its own root user takes a verified boot chain, which is outside edge-kit.

This module's source is also run as a script on the device (stdlib only above the ``verify`` part,
without ``site``): keep :func:`tree` free of imports beyond the standard library, and the module
free of top-level code that does anything but define.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

MANIFEST = "AGENT.json"
SCHEMA = "edgekit.agent-code/1"
MAX_MANIFEST_BYTES = 1 << 20  # a sha256 per file of the agent's code (a few hundred files at most)


def tree(folder: str | os.PathLike) -> dict[str, str]:
    """Return ``{relative path: sha256}`` of every file under ``folder`` but :data:`MANIFEST`, sorted.

    Symlinks are listed by their target text (never followed), so a link cannot hide a file; a FIFO, socket or
    device as ``not a regular file`` (never opened: reading a FIFO waits for a writer); a folder that cannot be
    listed is passed over (its files count as removed). Each entry's type comes from its folder's listing
    (:func:`os.scandir`) and every file is read into one buffer: an ``os.walk`` with an ``lstat`` and a ``stat`` per
    file took twice as long, at every agent start and in every deploy's probe.

    Raises:
        OSError: a regular file cannot be read.
    """
    out: dict[str, str] = {}
    buf = bytearray(1 << 16)
    folders = [(os.fspath(folder), "")]
    while folders:  # not recursive: no depth of folders reaches Python's recursion limit
        where, prefix = folders.pop()
        try:
            with os.scandir(where) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            rel = prefix + entry.name
            try:
                folder_entry = entry.is_dir(follow_symlinks=False)
            except OSError:
                folder_entry = False
            if folder_entry:
                folders.append((entry.path, rel + "/"))
            elif rel != MANIFEST:
                out[rel] = _listed(entry, buf)
    return dict(sorted(out.items()))


def _listed(entry: os.DirEntry, buf: bytearray) -> str:
    """Return what :func:`tree` lists for ``entry``, which is no folder: ``symlink:<target>``, ``not a regular file``,
    or the file's sha256 (read into ``buf``). Where the listing's type cannot be acted on (a folder that can be
    listed but not searched), the path's own ``lstat`` and ``stat`` decide. A file is opened without following a
    link or waiting for a writer and read only if it is still a regular file: one replaced since its folder was
    listed is listed as what it is now (opened as listed, a link was followed, /dev/zero read for ever, and a FIFO
    held the check).

    Raises:
        OSError: a regular file cannot be read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        if entry.is_symlink():
            return "symlink:" + os.readlink(entry.path)
        if not entry.is_file(follow_symlinks=False):  # a FIFO or a device: never opened (a FIFO held the check,
            return "not a regular file"  # and the deploy's probe, until their deadline), listed so that it differs
        fd = os.open(entry.path, flags)
    except OSError:
        if os.path.islink(entry.path):
            return "symlink:" + os.readlink(entry.path)
        if not os.path.isfile(entry.path):
            return "not a regular file"
        fd = os.open(entry.path, flags)
    h, view = hashlib.sha256(), memoryview(buf)
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        while True:
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Return one phrase per file that differs (``changed x``, ``added y``, ``removed z``), sorted by path."""
    out = []
    for rel in sorted(set(expected) | set(actual)):
        if rel not in actual:
            out.append(f"removed {rel}")
        elif rel not in expected:
            out.append(f"added {rel}")
        elif expected[rel] != actual[rel]:
            out.append(f"changed {rel}")
    return out


def code_manifest(files: dict[str, str], bundle_sha256: str) -> dict[str, Any]:
    """Return the (unsigned) :data:`MANIFEST` document for an unpacked bundle: sign it, then write it."""
    return {"schema": SCHEMA, "bundle": bundle_sha256, "files": dict(sorted(files.items()))}


def is_deployed(here: Path, root: Path) -> bool:
    """Return whether ``here`` (the resolved folder the agent's packages were imported from) is agent
    code a deploy put under ``root``: the folder ``<root>/agent`` points at, or an earlier version
    beside it (``<root>/agent-*``) that a running agent keeps using until the deploy restarts it."""
    root = Path(root).resolve()
    return here == (root / "agent").resolve() or (here.parent == root and here.name.startswith("agent-"))


def read_manifest(folder: Path) -> dict[str, Any]:
    """Return the agent code manifest in ``folder`` as it stands on disk (not verified: :func:`verify_code` does),
    read with a size bound (:data:`MAX_MANIFEST_BYTES`) and strictly (no NaN or infinity: it goes into a signed
    answer, ``state`` with ``code``).

    Raises:
        OSError: it cannot be read. ValueError: over the bound, not strict JSON, or not an agent code manifest.
    """
    from device_agents.disk import read_json

    doc = read_json(Path(folder) / MANIFEST, MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("files"), dict):
        raise ValueError("not an agent code manifest")
    return doc


def verify_code(folder: Path, operators: Path) -> dict[str, Any]:
    """Check the agent code under ``folder`` against its signed :data:`MANIFEST`.

    Returns:
        The manifest (``bundle``: the deployed bundle's sha256).

    Raises:
        CodeTampered: no manifest, a signature that does not verify under the keys in ``operators``,
            or a file that differs (the first three named, with how many more).
    """
    from device_agents.errors import CodeTampered
    from device_agents.identity import OPERATOR, Keyring, read_operators
    from edgekit_protocol.errors import EdgeKitError

    folder = Path(folder)
    try:
        doc = read_manifest(folder)
        Keyring(operators=read_operators(operators)).verify(doc, OPERATOR)
    except (OSError, ValueError, EdgeKitError) as exc:
        raise CodeTampered(f"{folder / MANIFEST}: {getattr(exc, 'strerror', None) or exc}; the agent code cannot be "
                           "trusted: run `edgekit deploy` to reinstall it") from None
    diff = differences(doc["files"], tree(folder))
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise CodeTampered(f"{folder}: agent code differs from what the operator signed ({', '.join(diff[:3])}{more}); "
                           "not started: run `edgekit deploy` to reinstall it")
    return doc

