"""The model store on a device: installed models, the ``current`` one and the ``previous`` one.

Layout under ``<root>`` (``/opt/edgekit`` as root, else ``~/.edgekit``)::

    models/<sha256>/model.tflite     the artifact, named by its own sha256 (``model.onnx`` for an ONNX one)
    models/<sha256>/meta.json        variant id, model name, sha256, bytes, format, when installed
    models/<sha256>/eval.npz         optional: x, y and the fp32 reference outputs for accuracy/fidelity
    current  -> models/<sha256>      switched with an atomic rename of a fresh symlink
    previous -> models/<sha256>      the one before, for rollback
    switch.json                      while a switch runs: the pair it goes to (see below)
    incoming/                        uploads in flight (``*.part``)
    models/.<sha256>.staging-<pid>   an install in progress (renamed to ``models/<sha256>`` when whole)
    models/.<sha256>.removing-<pid>  a removal in progress (renamed away first, then deleted)

An artifact's format (``tflite`` or ``onnx``) is read from its bytes at install
(:func:`device_agents.runtimes.model_format`), kept as ``format`` in ``meta.json`` and as the file's
suffix; :meth:`ModelStore.model_path` follows it, and every reader picks its runtime by it.

A model directory appears by renaming a complete staging directory, and goes by being renamed away
before it is deleted, so a reader never sees a half written or half deleted model; every rename is
followed by an fsync of its folder (:func:`device_agents.disk.durable_replace`), so a power loss
keeps it or undoes it whole. What a process killed mid-way leaves (staging and removal folders,
temporary links) is named by its pid and removed by :meth:`ModelStore.sweep` once that process is
gone (:meth:`ModelStore.ensure` calls it: the agent at start, every install). An upload that an
install had moved into its staging folder goes with it: the deploy (its command is answered
"interrupted") or the desired state sends it again.

``current`` and ``previous`` change together. A switch (activation, rollback) first writes the pair it
goes to, ``{"current", "previous"}``, to ``switch.json`` (atomically, fsynced: the switch's commit
point), then points ``previous``, then ``current``, then removes ``switch.json``. While that file is
there it is the truth: :meth:`ModelStore.current` and :meth:`ModelStore.previous` read the pair from
it, and :meth:`ModelStore.ensure` (the agent at start) finishes the switch. Only the agent, the store's writer,
finishes or removes it: a reader (an application's ``open_current``, ``edgekit-agent state``) that cannot read it
(another user) or finds no pair in it follows the links instead and changes nothing. So a crash or a full disk
at any step leaves either the old pair (before the commit) or the new one (after), never a mix: never
``previous`` equal to ``current``, never a rollback to the wrong model. A store an older agent left with
``previous`` equal to ``current`` has its ``previous`` link removed by :meth:`ModelStore.ensure`.

A model becomes ``current`` only after its sha256 is checked again and a child process has loaded
it and run one inference: a model that crashes the interpreter takes down the child, not the agent,
and the running model keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.disk import (
    atomic_write,
    durable_replace,
    fsync_dir,
    held,
    maker_gone,
    read_head,
    sha256_of,
    sweep_tmp,
    within_limit,
)
from device_agents.errors import (
    NO_ACTIVE_MODEL,
    AcceleratorUnavailable,
    SmokeFailed,
    SmokeTimedOut,
    StoreError,
)
from device_agents.formats import SUFFIX, model_format
from edgekit_protocol.desired import MAX_NAME_CHARS
from edgekit_protocol.labels import clip
from edgekit_protocol.messages import check_model_name, in_range, is_float, strict_loads

log = logging.getLogger("edgekit.agent.store")
SMOKE_TIMEOUT_S = 120.0
SWITCH = "switch.json"  # the pair a switch goes to, while it runs
META = "meta.json"
MAX_META_BYTES = 64 * 1024  # a model's meta.json: install writes a few hundred bytes; a larger one is damaged, not read
UNREADABLE_META = "meta.json is missing or unreadable"
_LEFTOVER = re.compile(r"^\.[0-9a-f]{64}\.(staging|removing)-(\d+)$")  # in models/: an install's or a removal's


def default_root() -> Path:
    """Return ``/opt/edgekit`` when running as root, else ``~/.edgekit``."""
    return Path("/opt/edgekit") if os.geteuid() == 0 else Path.home() / ".edgekit"



def is_sha256(value: str) -> bool:
    """Return True when ``value`` is a sha256 in lower-case hex (how models, links and downloads are named)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Installed:
    """One model in the store; ``fresh`` is False when it was already there."""

    sha256: str
    variant: str
    model: str
    path: Path
    fresh: bool = True


def _printable_name(value: Any, what: str) -> str:
    """Return ``value`` when it is 1 to :data:`edgekit_protocol.desired.MAX_NAME_CHARS` printable characters, not all
    blank: a name that goes into every status, telemetry, live and reported message (receivers refuse a longer one,
    and past 64 KiB the broker the whole message) and is shown on terminals (no control character, which would drive
    them, no lone surrogate, which has no UTF-8 form); an empty one could never be named again.

    Raises:
        ValueError: it is not; the text names ``what``, quotes it cut short (escaped) and states the rule.
    """
    if not isinstance(value, str) or not value.strip() or not value.isprintable() or len(value) > MAX_NAME_CHARS:
        shown = repr(clip(value, 40)) if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{what} {shown} is not a name of 1-{MAX_NAME_CHARS} printable characters")
    return value


def check_variant(value: Any) -> str:
    """Return ``value`` when it can be a variant's name in the store (:func:`_printable_name`: what a desired state may
    name). The one rule for :meth:`ModelStore.install` and for reading ``meta.json`` (:func:`read_meta`).

    Raises:
        ValueError: it is not; the text quotes it cut short and states the rule.
    """
    return _printable_name(value, "variant")


def meta_fault(data: bytes) -> str | None:
    """Return why the bytes of a model's ``meta.json`` are damaged whatever they say, else None: over
    :data:`MAX_META_BYTES` (:func:`device_agents.disk.within_limit`'s line) or not UTF-8 (:data:`UNREADABLE_META`, as
    :func:`read_meta` says of them). The part of :func:`read_meta`'s rule that needs no JSON parser: the deploy's probe
    runs this function's source on the device (with :func:`device_agents.disk.within_limit`'s), and sends this line
    instead of such bytes, so what it prints stays bounded whatever a damaged file holds."""
    try:
        within_limit(data, MAX_META_BYTES, META)
        data.decode("utf-8")
    except UnicodeDecodeError:
        return UNREADABLE_META
    except ValueError as exc:
        return str(exc)
    return None


def read_meta(data: str | bytes | None, sha256: str) -> dict[str, Any]:
    """Return the metadata of the stored model ``sha256`` that ``data`` holds (its ``meta.json`` as
    :func:`device_agents.disk.read_head` reads it, at most :data:`MAX_META_BYTES` + 1 bytes; None: there is none),
    checked against what any agent's :meth:`ModelStore.install` wrote. The file is read from disk, where it may be
    damaged or edited by hand, and its fields go into signed messages (a NaN cannot be signed, a long variant makes
    every message too large): one that fails is a damaged ``meta.json``, a state the agent reports and a deploy
    repairs. The one rule for the agent's store and the deploy's probe (``edge_kit.fleet.ssh``).

    The model's name is held to what was always safe to carry and show, not to the newer rule of model names
    (:func:`edgekit_protocol.messages.check_model_name`) that install applies: agents before it installed any printable
    name (``face detector``), and their models must go on being served and reported after an upgrade.

    Raises:
        ValueError: one line starting ``meta.json``: it is missing or not UTF-8 JSON (:data:`UNREADABLE_META`), over
            :data:`MAX_META_BYTES` (:func:`device_agents.disk.within_limit`; both checked by :func:`meta_fault` first for
            bytes), holds a NaN, an infinity or a key twice,
            is not an object, or a field is out of contract: ``sha256`` not the folder's name, ``variant``
            (:func:`check_variant`), ``model`` not 1 to :data:`edgekit_protocol.desired.MAX_NAME_CHARS` printable
            characters, ``bytes`` not a whole number from 0, ``installed`` not a finite number, ``format`` not a known
            one, ``eval_sha256`` not a sha256 (fields an older agent did not write may be missing).
    """
    if data is None:
        raise ValueError(UNREADABLE_META)
    fault = meta_fault(data) if isinstance(data, bytes) else None
    if fault is not None:
        raise ValueError(fault)
    within_limit(data, MAX_META_BYTES, META)
    try:
        meta = strict_loads(data, META)
    except ValueError as exc:  # MessageError is one; cut short or garbled: "unreadable", as ever
        why = str(exc)
        unreadable = (f"{META} is not UTF-8", f"{META} is not JSON", f"{META} holds an integer too long",
                      f"{META} is nested too deeply")
        raise ValueError(UNREADABLE_META if why.startswith(unreadable) else why) from None
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is a JSON {type(meta).__name__}, not an object")
    if meta.get("sha256") != sha256:
        raise ValueError(f"{META}: sha256 is not the model's ({sha256[:12]}...)")
    try:
        check_variant(meta.get("variant"))
        _printable_name(meta.get("model"), "model name")  # not check_model_name: an older agent took any such name
    except ValueError as exc:
        raise ValueError(f"{META}: {exc}") from None
    size, installed, fmt, eval_sha = (meta.get(k) for k in ("bytes", "installed", "format", "eval_sha256"))
    if size is not None and not (isinstance(size, int) and in_range(size, 1e18) and size >= 0):
        raise ValueError(f"{META}: bytes is not a whole number from 0")
    if installed is not None and not is_float(installed):
        raise ValueError(f"{META}: installed is not a time (a finite number)")
    if fmt is not None and fmt not in SUFFIX:
        raise ValueError(f"{META}: format {clip(str(fmt), 20)!r} is not one of {', '.join(SUFFIX)}")
    if eval_sha is not None and not is_sha256(eval_sha):
        raise ValueError(f"{META}: eval_sha256 is not a sha256")
    return meta


def damage(meta: dict | None, sha256: str, hashes: dict[str, str], meta_error: str | None = None) -> str | None:
    """Return what is wrong with the stored model ``sha256``, or None when it is intact: ``meta`` is its
    ``meta.json`` as :func:`read_meta` returns it (None: missing, unreadable or out of contract, ``meta_error`` saying
    why), ``hashes`` the sha256 of each file its folder holds, by name
    (``model.tflite``, ``model.onnx``, ``eval.npz``; a file that is not there is left out). The one rule for
    the agent's own check (:meth:`ModelStore.damaged`) and the deploy's, which hashes on the device with a
    script of its own (``edge_kit.fleet.ssh``)."""
    if meta is None:
        return meta_error or UNREADABLE_META
    fmt = meta.get("format")
    if hashes.get("model" + SUFFIX[fmt if isinstance(fmt, str) and fmt in SUFFIX else "tflite"]) != sha256:
        return "the artifact no longer hashes to its sha256"
    if "eval.npz" in hashes and not meta.get("eval_sha256"):
        return "the eval set has no recorded sha256 (installed by an older agent)"
    if meta.get("eval_sha256") and hashes.get("eval.npz") != meta["eval_sha256"]:
        return "the eval set no longer hashes to its sha256"
    return None


class ModelStore:
    """The on-device model folder. Every method is safe to call from a separate process too."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self.models = self.root / "models"
        self.incoming = self.root / "incoming"
        # reads of a switch.json that could not be read or did not name a pair (the links were followed instead);
        # the first is logged, once per store object (an application's open_current keeps one for its life)
        self.switch_unread = 0

    def ensure(self) -> None:
        """Create the folders (no-op when they exist), :meth:`sweep` what killed processes left, and finish a
        switch a crash cut short (:meth:`recover`)."""
        self.models.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.sweep()
        self.recover()

    def recover(self) -> str | None:
        """Make the ``current`` and ``previous`` links a consistent pair again: finish a switch that
        ``switch.json`` records (a crash or a full disk cut it short), and drop a ``previous`` link equal to
        ``current`` (what an older agent could leave).

        Returns:
            What was done, or None when the links were consistent. Never raises: a link that cannot be
            written now (a full disk) is tried again next time, and readers follow ``switch.json`` meanwhile.
        """
        try:
            pair = self._pending(repair=True)
            if pair is not None:
                self._apply(*pair)
                return f"finished the switch to {str(pair[0])[:12]} cut short"
            cur, prev = self._link("current"), self._link("previous")
            if prev is not None and prev == cur:
                self._point("previous", None)
                return f"dropped previous: it was current ({cur[:12]}) too"
        except OSError as exc:
            log.error("model store: could not finish a switch (%s); tried again at the next start", exc.strerror or exc)
        return None

    def sweep(self) -> list[str]:
        """Remove what a store operation killed mid-way (power loss, SIGKILL) left behind: staging
        folders of installs, folders of removals, temporary links and files in the root. Only the
        leftovers of processes that no longer run are touched (:func:`~device_agents.disk.maker_gone`: one made
        before the process that has its pid now started is gone), so an install running in another process keeps its
        staging folder.

        Returns:
            The names removed. Never raises: what cannot be removed now is tried again next time.
        """
        removed = sweep_tmp(self.root)
        try:
            entries = list(self.models.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            m = _LEFTOVER.match(entry.name)
            if m and maker_gone(entry, int(m.group(2))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def _discard(self, folder: Path) -> None:
        """Delete a model folder without ever leaving it half there: it is renamed away first (a
        removal folder that :meth:`sweep` finishes if this process dies), then deleted; returns nothing.

        Raises:
            OSError: the rename failed (the folder is still whole).
        """
        if not folder.exists():
            return
        gone = self.models / f".{folder.name}.removing-{os.getpid()}"
        shutil.rmtree(gone, ignore_errors=True)
        durable_replace(folder, gone)
        shutil.rmtree(gone, ignore_errors=True)

    # --- installing ---------------------------------------------------------------------------

    def install(self, src: Path, *, variant: str, model: str, expect_sha256: str | None = None,
                eval_file: Path | None = None, expect_eval_sha256: str | None = None, move: bool = False) -> Installed:
        """Copy (``move``: move) ``src`` into ``models/<sha256>/`` with its metadata (and eval set), atomically.

        The eval set's sha256 is kept in the metadata and checked whenever it is used: it carries the
        metric (and any user metric code) that benchmarks run.

        Returns:
            The installed model; ``fresh`` is False when the same sha256 was already installed.

        Raises:
            StoreError: ``variant`` is not a variant's name (:func:`check_variant`: empty, longer than
                :data:`edgekit_protocol.desired.MAX_NAME_CHARS` or holding control characters), ``model`` is not a model name
                (:func:`edgekit_protocol.messages.check_model_name`), ``src`` is missing or not a
                file (then no store is made), its sha256 (or the eval set's) differs from what was
                expected, or the copy failed (disk full, permissions); nothing is left behind in ``models/``.
        """
        src = Path(src)
        try:
            check_variant(variant)
        except ValueError:
            raise StoreError(f"variant {clip(variant, 40)!r}: give a name of 1-{MAX_NAME_CHARS} printable characters, "
                             "e.g. int8") from None
        try:
            check_model_name(model)
        except ValueError as exc:
            raise StoreError(f"{exc}, e.g. digits (the name the manifest gives it)") from None
        if not src.is_file():  # before the store is made: a mistyped path leaves no empty store behind
            raise StoreError(f"{src}: {'not a file' if src.exists() else 'no such file'}; give the model file to install")
        self.ensure()
        digest = sha256_of(src)
        if expect_sha256 and digest != expect_sha256:
            raise StoreError(f"{src}: sha256 is {digest[:12]}..., expected {expect_sha256[:12]}... (corrupt or truncated upload)")
        eval_digest = sha256_of(eval_file) if eval_file is not None and Path(eval_file).is_file() else None
        if expect_eval_sha256 and eval_digest != expect_eval_sha256:
            raise StoreError(f"{eval_file}: sha256 is {str(eval_digest)[:12]}..., expected {expect_eval_sha256[:12]}... "
                             "(corrupt or truncated upload)")
        target = self.models / digest
        same_eval = eval_digest is None or (self._meta(digest) or {}).get("eval_sha256") == eval_digest
        if self._intact(digest) and same_eval:  # a new eval set for the same model: installed again, whole
            meta = self._meta(digest) or {}
            if move:
                src.unlink()
            return Installed(digest, meta.get("variant", variant), meta.get("model", model), target, fresh=False)
        size = src.stat().st_size
        try:
            fmt = model_format(src)
        except OSError as exc:
            raise StoreError(f"cannot read {src}: {exc.strerror or exc}") from None
        name = "model" + SUFFIX[fmt]
        staging = self.models / f".{digest}.staging-{os.getpid()}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            with held(staging):  # a sweep meanwhile keeps it, though the clock was set forward since it was made
                if move:
                    shutil.move(src, staging / name)  # a rename on one filesystem: no second copy on the card
                else:
                    shutil.copyfile(src, staging / name)
                if eval_file is not None:
                    shutil.copyfile(eval_file, staging / "eval.npz")
                meta = {"sha256": digest, "variant": variant, "model": model, "bytes": size, "format": fmt,
                        "installed": time.time(), "eval": "eval.npz" if eval_file is not None else None,
                        "eval_sha256": eval_digest}
                (staging / META).write_text(json.dumps(meta, indent=2))
                for f in staging.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                fsync_dir(staging)  # its entries are on disk before the rename that makes it the model
                self._discard(target)  # a damaged copy: replaced whole
                durable_replace(staging, target)
        except OSError as exc:
            if move and not src.exists() and (staging / name).is_file():
                shutil.move(staging / name, src)  # the caller's file is not lost with the staging folder
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot install {src.name} into {self.models}: {exc.strerror or exc}") from None
        return Installed(digest, variant, model, target)

    def remove(self, sha256: str) -> None:
        """Delete an installed model that is neither current nor previous; returns nothing.

        Raises:
            StoreError: it is current or previous, or its folder cannot be renamed away.
        """
        if sha256 in (self.current(), self.previous()):
            raise StoreError(f"model {sha256[:12]} is in use (current or previous); activate another first")
        self._remove_engines(sha256)  # first: killed before the model goes, its engine is built again when used
        try:
            self._discard(self.models / sha256)
        except OSError as exc:
            raise StoreError(f"cannot remove model {sha256[:12]}: {exc.strerror or exc}") from None

    def _engine_dirs(self, sha256: str) -> list[Path]:
        """Return the TensorRT engine folders built from model ``sha256`` (:mod:`device_agents.runtimes.tensorrt`)."""
        return [d for d in (self.root / "engines").glob(f"{sha256}-*") if d.is_dir()]

    def _remove_engines(self, sha256: str) -> None:
        """Remove the TensorRT engines built from model ``sha256`` (they go with the model)."""
        for folder in self._engine_dirs(sha256):
            shutil.rmtree(folder, ignore_errors=True)

    def prune(self, budget_bytes: int, keep: set[str]) -> list[dict]:
        """Remove the oldest models until the store holds at most ``budget_bytes``.

        Never removes ``current``, ``previous`` or a model in ``keep`` (the candidates of the last
        tune or deploy); when those alone are over the budget, it stops there.

        Returns:
            The metadata of each removed model (sha256, variant, model, bytes), oldest first.
        """
        protected = keep | {self.current(), self.previous()}
        models = self.installed()
        total = sum(self._bytes(m["sha256"]) for m in models)
        removed = []
        for meta in models:  # oldest first
            if total <= budget_bytes:
                break
            if meta["sha256"] in protected:
                continue
            size = self._bytes(meta["sha256"])
            self._remove_engines(meta["sha256"])  # first, as in remove()
            try:
                self._discard(self.models / meta["sha256"])
            except OSError as exc:
                log.warning("store budget: cannot remove model %s: %s", meta["sha256"][:12], exc.strerror or exc)
                continue
            total -= size
            removed.append({k: meta.get(k) for k in ("sha256", "variant", "model")} | {"bytes": size})
        return removed

    def _bytes(self, sha256: str) -> int:
        """Return the bytes a model's folder holds (artifact, metadata, eval set), and its TensorRT engines'."""
        files = [*(self.models / sha256).glob("*"), *(f for d in self._engine_dirs(sha256) for f in d.glob("*"))]
        return sum(f.stat().st_size for f in files if f.is_file())

    # --- reading ------------------------------------------------------------------------------

    def _read_meta(self, sha256: str) -> tuple[dict | None, str | None]:
        """Return ``(metadata, None)`` for a model whose ``meta.json`` passes :func:`read_meta`, else ``(None, why)``:
        read with a size bound (:func:`device_agents.disk.read_head`: a file over :data:`MAX_META_BYTES` is not read
        whole)."""
        try:
            data: bytes | None = read_head(self.models / sha256 / META, MAX_META_BYTES)
        except OSError:
            data = None
        try:
            return read_meta(data, sha256), None
        except ValueError as exc:
            return None, str(exc)

    def _meta(self, sha256: str) -> dict | None:
        """Return a model's metadata when its ``meta.json`` passes :func:`read_meta`, else None (damaged or missing)."""
        return self._read_meta(sha256)[0]

    def _link(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except OSError:
            return None
        sha = Path(target).name
        return sha if is_sha256(sha) else None

    def _pending(self, repair: bool = False) -> tuple[str, str | None] | None:
        """Return the ``(current, previous)`` pair of a switch under way or cut short (``switch.json``), or None
        when there is none, or it cannot be read or does not name a pair: the links stand then.

        Only the agent (the store's writer, through :meth:`recover`: ``repair``) removes a file that reads but does
        not name a pair (a hand edit). A reader (``open_current`` in an application, ``edgekit-agent state``, every
        :meth:`current` and :meth:`previous`) changes nothing: the file may be a switch in progress it may not read,
        or is seeing mid-write, and is the agent's record of it. Such a read is counted in ``switch_unread`` and
        logged once per store object. Never raises.
        """
        path = self.root / SWITCH
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # no permission (another user), an I/O error, not UTF-8
            return self._unread(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc})", repair)
        try:
            pair = json.loads(text)
        except ValueError:
            pair = None
        cur, prev = (pair.get("current"), pair.get("previous")) if isinstance(pair, dict) else (None, None)
        if is_sha256(cur) and (prev is None or is_sha256(prev)) and prev != cur:
            return cur, prev
        if not repair:
            return self._unread(f"{path} does not name a pair of models (a switch being written, or a hand edit)", False)
        log.error("%s does not name a pair of models; removed (the links stand)", path)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("model store: cannot remove %s (%s)", path, exc.strerror or exc)
        return None

    def _unread(self, why: str, repair: bool) -> None:
        """Count a ``switch.json`` that was not followed (``why``), log it (the first time for this store object, or
        always for the agent's :meth:`recover`: ``repair``), and return None: the links stand."""
        self.switch_unread += 1
        if repair or self.switch_unread == 1:
            log.warning("%s; following the current and previous links (a switch in progress is finished by the "
                        "agent, never by a reader)", why)
        return None

    def current(self) -> str | None:
        """Return the sha256 of the current model (a switch's, while ``switch.json`` records one), or None."""
        pair = self._pending()
        return pair[0] if pair is not None else self._link("current")

    def previous(self) -> str | None:
        """Return the sha256 of the previous model (a switch's, while ``switch.json`` records one), or None."""
        pair = self._pending()
        if pair is not None:
            return pair[1]
        prev = self._link("previous")
        return None if prev == self._link("current") else prev  # an older agent's half switch: no previous

    def describe(self, sha256: str | None) -> dict | None:
        """Return a model's metadata (``sha256``, ``variant``, ``model``, ``bytes``...); for a model
        whose ``meta.json`` is missing, unreadable or out of contract (:func:`read_meta`), ``{"sha256", "damaged"}``
        with why (a state to repair, not "no model"); None when there is no such model."""
        if sha256 is None:
            return None
        meta, why = self._read_meta(sha256)
        if meta is None and (self.models / sha256).is_dir():
            return {"sha256": sha256, "damaged": why}
        return meta

    def _damage(self, sha256: str) -> str | None:
        """Return what is wrong with a stored model (metadata, artifact or eval set), or None when intact."""
        folder = self.models / sha256
        meta, why = self._read_meta(sha256)
        names = ["model" + suffix for suffix in SUFFIX.values()] + ["eval.npz"]
        return damage(meta, sha256, {n: sha256_of(folder / n) for n in names if (folder / n).is_file()}, why)

    def _intact(self, sha256: str) -> bool:
        """Return True when the model's metadata reads and its artifact and eval set still hash as recorded."""
        return (self.models / sha256).is_dir() and self._damage(sha256) is None

    def damaged(self) -> list[dict]:
        """Return ``{"sha256", "damaged"}`` for every stored model whose metadata, artifact or eval set
        fails its check (hashing every file: what a deploy asks for before it decides what to upload)."""
        return [{"sha256": folder.name, "damaged": why} for folder in sorted(self.models.glob("*"))
                if is_sha256(folder.name) and (why := self._damage(folder.name)) is not None]

    def installed(self) -> list[dict]:
        """Return the metadata of every installed model, oldest first."""
        metas = [m for d in self.models.glob("*") if is_sha256(d.name) and (m := self._meta(d.name))]
        return sorted(metas, key=lambda m: m.get("installed", 0))

    def model_format(self, sha256: str) -> str:
        """Return the installed model's format, ``tflite`` or ``onnx`` (``meta.json``; ``tflite`` when it
        does not say: models installed before formats were recorded were all ``.tflite``)."""
        fmt = (self._meta(sha256) or {}).get("format")
        return fmt if fmt in SUFFIX else "tflite"

    def model_path(self, sha256: str) -> Path:
        """Return the path of an installed model's artifact (``model.tflite`` or ``model.onnx``, by its format)."""
        return self.models / sha256 / ("model" + SUFFIX[self.model_format(sha256)])

    def eval_path(self, sha256: str) -> Path | None:
        """Return the model's shipped eval set after checking its sha256 against the metadata, or None.

        Raises:
            StoreError: the eval set no longer hashes as installed (it holds metric code: never run it).
        """
        path = self.models / sha256 / "eval.npz"
        if not path.is_file():
            return None
        expected = (self._meta(sha256) or {}).get("eval_sha256")
        if not expected or sha256_of(path) != expected:
            raise StoreError(f"model {sha256[:12]}: eval.npz no longer hashes to the sha256 it was installed with "
                             "(it carries the metric code benchmarks run); deploy again to repair it")
        return path

    def resolve(self, *, sha256: str | None = None, variant: str | None = None) -> str:
        """Return the sha256 of the installed model meant by ``sha256`` or ``variant`` (else current).

        A variant id picks the most recently installed model of that variant, preferring the
        current model's name when several models are installed.

        Raises:
            StoreError: nothing installed matches, or nothing is current when neither is given.
        """
        if sha256:
            if not is_sha256(sha256) or self._meta(sha256) is None:
                raise StoreError(f"model {str(sha256)[:16]} is not installed on this device")
            return sha256
        if variant:
            current = self.describe(self.current()) or {}
            hits = [m for m in self.installed() if m.get("variant") == variant]
            same = [m for m in hits if m.get("model") == current.get("model")]
            if not (same or hits):
                have = sorted({str(m.get("variant")) for m in self.installed()})
                raise StoreError(f"variant {variant!r} is not installed on this device (installed: {', '.join(have) or 'none'})")
            return (same or hits)[-1]["sha256"]
        cur = self.current()
        if cur is None:
            raise StoreError(NO_ACTIVE_MODEL)
        return cur

    def verify(self, sha256: str) -> Path:
        """Return the model path after checking the file's sha256 against its name and metadata.

        Raises:
            StoreError: the file is missing, its content does not match, or its ``meta.json`` is damaged
                (:func:`read_meta`).
        """
        path = self.model_path(sha256)
        meta, why = self._read_meta(sha256)
        if meta is None and path.is_file():
            raise StoreError(f"model {sha256[:12]}: {why}; deploy it again to repair it")
        if meta is None or not path.is_file():
            raise StoreError(f"model {sha256[:12]} is not installed (no {path.name} or {META})")
        actual = sha256_of(path)
        if actual != sha256 or meta.get("sha256") != sha256:
            raise StoreError(f"model {sha256[:12]}: file sha256 is {actual[:12]}..., manifest says {sha256[:12]}... "
                             "(corrupt or truncated); reinstall it")
        return path

    # --- switching ----------------------------------------------------------------------------

    def _point(self, name: str, sha256: str | None) -> None:
        """Point link ``name`` at ``models/<sha256>`` (None: remove it), durably; returns nothing.

        Raises:
            OSError: the link could not be written (the old one stays).
        """
        link = self.root / name
        if sha256 is None:
            link.unlink(missing_ok=True)
            fsync_dir(self.root)
            return
        tmp = self.root / f".{name}.{os.getpid()}.tmp"  # a killed writer's is swept (sweep_tmp)
        tmp.unlink(missing_ok=True)
        os.symlink(f"models/{sha256}", tmp)
        durable_replace(tmp, link)  # rename(2) over the old link: readers see the old or the new one

    def activate(self, sha256: str, *, runtime: str | None = None, delegate: str = "xnnpack",
                 options: dict[str, Any] | None = None, threads: int = 1,
                 smoke: Callable[..., dict] | None = None, timeout: float = SMOKE_TIMEOUT_S,
                 deadline: float | None = None) -> dict:
        """Make an installed model current after checking it; the old current becomes previous.

        ``smoke`` is the :class:`~device_agents.smoke.SmokePool` that runs the check in a child
        process (the agent passes its long-lived, warm one; by default a new one is made). ``delegate`` and
        ``options`` are the agent's; the model runs with those its variant takes (:meth:`delegate_for`: a CPU
        variant on the CPU where ``delegate`` is the Edge TPU). ``deadline`` (unix time, the command's expiry): the
        smoke check gets no longer than what is left of it, and no switch is made after it (the sender stopped waiting
        for the answer: a switch then would be one it never hears of).

        Returns:
            ``{"current": sha, "previous": sha|None, "changed": bool, "smoke": {...}}``.

        Raises:
            StoreError: not installed, sha256 mismatch, its format's runtime is not installed here (the
                message says how to install it), the smoke inference failed, or ``deadline`` passed (before, during or
                after the smoke check: a check timed out by it is not said as the model's failure; nothing changed).
        """
        path = self.verify(sha256)
        old = self.current()
        if old == sha256:
            return {"current": sha256, "previous": self.previous(), "changed": False, "smoke": None}
        from device_agents.runtimes import (  # numpy and the runtimes: only here
            RuntimeUnavailable,
            get_runtime,
        )

        try:  # this process serves it next: its runtime must be here, not only in the smoke check's child
            get_runtime(runtime, model=path)
        except RuntimeUnavailable as exc:
            raise StoreError(f"model {sha256[:12]} ({(self._meta(sha256) or {}).get('variant')}): {exc}") from None
        delegate, options = self.delegate_for(sha256, delegate, options)
        self.check_accelerator(sha256, delegate, options)
        if smoke is None:
            from device_agents.smoke import (
                SmokePool,  # imports numpy and the interpreter: only when needed
            )

            smoke = SmokePool()
        left = timeout if deadline is None else self._left(sha256, deadline, "before its smoke check")
        cut = left < timeout  # the check gets what is left of the command: its timing out is the expiry's doing
        timeout = min(timeout, left)
        try:
            checked = smoke(path, runtime=runtime, delegate=delegate, options=options, threads=threads, timeout=timeout)
        except SmokeFailed as exc:
            if cut and isinstance(exc, SmokeTimedOut) and exc.how != "stopped":
                raise StoreError(f"activation of model {sha256[:12]} expired during its smoke check, cut to the "
                                 f"{timeout:.1f} s its command had left (the sender stopped waiting for the answer); "
                                 "nothing changed") from None
            raise StoreError(f"model {sha256[:12]} failed its smoke inference: {exc}") from None
        if deadline is not None:
            self._left(sha256, deadline, "after its smoke check passed")
        previous = self._switch(sha256, old)
        return {"current": sha256, "previous": previous, "changed": True, "smoke": checked}

    @staticmethod
    def _left(sha256: str, deadline: float, when: str) -> float:
        """Return the seconds left before ``deadline`` (unix time).

        Raises:
            StoreError: none are left (``when`` says at which step); nothing was switched.
        """
        left = deadline - time.time()
        if left <= 0:
            raise StoreError(f"activation of model {sha256[:12]} expired {-left:.1f} s {when} (the sender stopped "
                             "waiting for the answer); nothing changed")
        return left

    def delegate_for(self, sha256: str, delegate: str,
                     options: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
        """Return ``(delegate, options)`` that installed model ``sha256`` runs with where the agent's own are
        ``delegate`` and ``options``: those of what its variant was compiled for
        (:func:`device_agents.targets.delegate_for`: only the ``edgetpu`` variant takes the Edge TPU's delegate, the
        CPU variants run on the CPU)."""
        from device_agents.targets import delegate_for

        variant = (self._meta(sha256) or {}).get("variant")
        return delegate_for(variant if isinstance(variant, str) else None, delegate, options)

    def check_accelerator(self, sha256: str, delegate: str, options: dict[str, Any] | None = None) -> None:
        """Refuse a model made for an accelerator this device does not have (an ``edgetpu`` variant without the
        Edge TPU's delegate, or without the Edge TPU its ``options`` name); return nothing. Such a model is not broken,
        it only cannot run here: the refusal says what is missing and what to install, and nothing is loaded or changed.

        Raises:
            AcceleratorUnavailable: the model's variant needs a delegate this agent does not run or cannot load, or
                an accelerator ``options`` name that is not attached (or options its target does not take).
        """
        from device_agents.targets import accelerator_missing

        variant = (self._meta(sha256) or {}).get("variant")
        if (why := accelerator_missing(variant if isinstance(variant, str) else None, delegate, options)) is not None:
            raise AcceleratorUnavailable(f"model {sha256[:12]} ({variant}) cannot run on this device: {why}; the "
                                         "current model keeps serving")

    def _switch(self, current: str, previous: str | None) -> str | None:
        """Make ``(current, previous)`` the store's pair, crash-safe (the module's docstring); return ``previous``.

        Raises:
            StoreError: ``switch.json`` could not be written (a full disk): nothing changed. Once it is written,
                the switch stands: a link that cannot be written now is finished by :meth:`recover`.
        """
        if previous == current:
            previous = None
        try:
            atomic_write(self.root / SWITCH, json.dumps({"current": current, "previous": previous}).encode())
        except OSError as exc:
            raise StoreError(f"cannot switch to model {current[:12]}: writing {self.root / SWITCH} failed "
                             f"({exc.strerror or exc}); nothing changed") from None
        try:
            self._apply(current, previous)
        except OSError as exc:
            log.error("model store: switched to %s, but its links could not be written yet (%s); finished at the "
                      "next start", current[:12], exc.strerror or exc)
        return previous

    def _apply(self, current: str, previous: str | None) -> None:
        """Point ``previous``, then ``current``, at the pair ``switch.json`` records, then remove it; return nothing.

        Raises:
            OSError: a link could not be written (``switch.json`` stays: the pair still stands).
        """
        self._point("previous", previous)
        self._point("current", current)
        (self.root / SWITCH).unlink(missing_ok=True)
        fsync_dir(self.root)

    def rollback(self) -> dict:
        """Swap ``current`` and ``previous``.

        Returns:
            ``{"current": sha, "previous": sha|None}`` after the swap.

        Raises:
            StoreError: there is no previous model, or it no longer verifies.
        """
        prev, cur = self.previous(), self.current()
        if prev is None or prev == cur:
            raise StoreError("no previous model to roll back to")
        self.verify(prev)
        self._switch(prev, cur)
        return {"current": prev, "previous": cur}
