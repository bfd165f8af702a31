"""The artifact store: a folder any HTTP server, object store or CDN can serve as static files.

``edgekit publish ARTIFACTS --store DIR`` copies a compiled model's folder into it::

    <store>/sha256/<hash>                              every artifact, the eval set, calibration
                                                       tables, any other file: the bytes, named by
                                                       their sha256 (immutable: cache forever)
    <store>/manifests/<model>/<manifest sha256>.json   the manifest exactly as compiled (bytes
                                                       unchanged, so a signature over it still holds)
    <store>/manifests/<model>/<manifest sha256>.files.json
                                                       file name -> sha256 and bytes for every file
                                                       published with it (what the manifest does not
                                                       list itself, e.g. calibration tables)
    <store>/manifests/<model>/latest.json              the last manifest published for the model
                                                       (mutable: serve with no-cache)

Devices fetch ``<store>/sha256/<hash>`` with :func:`device_agents.fetch.fetch` and check the hash
before they install. Every write is a temporary file in the same folder, fsynced and renamed, so a
reader (or a sync to S3 running at the same time) never sees half a file; an object already there
with the right hash is left alone, so publishing twice writes nothing but ``latest.json`` (and not
even that when it is already the same manifest).

Only local folders are written; an S3 bucket or a CDN origin is filled from the folder by a sync
(``aws s3 sync``, ``rclone``; docs/artifact-store.md shows the cache headers to set).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agents.disk import fsync_dir
from edge_kit.errors import InputError
from edge_kit.fsutil import atomic_write_bytes, sha256_file
from edge_kit.manifest import read_manifest


@dataclass(frozen=True)
class StoredFile:
    """One object of a publish: ``kind`` (artifact, eval, file, manifest, files, latest), ``name``
    (the variant id or file name), its ``sha256`` and ``bytes``, ``path`` relative to the store,
    and ``written`` (False: it was already there with the right bytes)."""

    kind: str
    name: str
    sha256: str
    bytes: int
    path: str
    written: bool


@dataclass
class PublishResult:
    """What :func:`publish` did: the store folder, the model, the manifest's sha256 and every object."""

    store: Path
    model: str
    manifest_sha256: str
    files: list[StoredFile] = field(default_factory=list)

    @property
    def written(self) -> list[StoredFile]:
        """Return the objects this publish wrote."""
        return [f for f in self.files if f.written]

    @property
    def present(self) -> list[StoredFile]:
        """Return the objects that were already in the store."""
        return [f for f in self.files if not f.written]

    def as_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data (``--json``)."""
        return {"store": str(self.store), "model": self.model, "manifest_sha256": self.manifest_sha256,
                "manifest": f"manifests/{self.model}/{self.manifest_sha256}.json",
                "written": len(self.written), "already_there": len(self.present),
                "bytes_written": sum(f.bytes for f in self.written),
                "files": [asdict(f) for f in self.files]}


def object_path(store: Path, sha256: str) -> Path:
    """Return where the store keeps the object with this sha256 (``<store>/sha256/<hash>``)."""
    return Path(store) / "sha256" / sha256


def _store_folder(store: str | Path) -> Path:
    text = str(store)
    if not text.strip():  # Path("") is the current folder: a store would be written all over it
        raise InputError("--store '': give the store folder, e.g. --store store")
    if "://" in text:
        raise InputError(f"--store {text}: only a local folder is written; publish to a folder, then sync it to the "
                         "bucket or CDN origin (e.g. `aws s3 sync DIR s3://bucket/prefix`, see docs/artifact-store.md)")
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--store {folder}: not a folder")
    for inner in (folder.resolve(), *folder.resolve().parents):  # e.g. --store store/sha256: a store in a store
        root = inner.parent
        if inner.name in ("sha256", "manifests") and (root / "sha256").is_dir() and (root / "manifests").is_dir():
            raise InputError(f"--store {text}: inside the store {root} (its {inner.name}/ folder), where a second "
                             f"store's folders would sit among its objects; give --store {root}")
    try:
        (folder / "sha256").mkdir(parents=True, exist_ok=True)
        (folder / "manifests").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--store {folder}: cannot create the store there ({exc.strerror or exc})") from None
    return folder


def _put(store: Path, source: Path, expect_sha: str | None, kind: str, name: str) -> StoredFile:
    """Copy ``source`` into ``<store>/sha256/<hash>`` unless an object with that hash and bytes is there."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise InputError(f"{source}: unreadable ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha is not None and digest != expect_sha:
        raise InputError(f"{source}: sha256 {digest[:12]}… differs from the manifest's {expect_sha[:12]}…; the "
                         "artifacts folder was changed after compiling: compile again")
    target = object_path(store, digest)
    return StoredFile(kind, name, digest, len(data), f"sha256/{digest}", _write_if_new(target, data, digest))


def _write_if_new(target: Path, data: bytes, digest: str) -> bool:
    """Write ``data`` to ``target`` unless it already holds exactly these bytes; return True if written."""
    if target.is_file() and target.stat().st_size == len(data) and sha256_file(target) == digest:
        return False
    try:
        atomic_write_bytes(target, data)
    except OSError as exc:
        raise InputError(f"{target}: cannot write to the store ({exc.strerror or exc})") from None
    return True


def publish(artifacts: Path, store: str | Path) -> PublishResult:
    """Publish a compiled model's folder (with ``manifest.json``) into the store folder ``store``.

    Every built artifact, the eval set and any other file in the folder (calibration tables, ...)
    go to ``sha256/<hash>``; artifacts and the eval set are checked against the manifest's hashes
    first. Then the manifest (as it is on disk), its file index and ``latest.json`` go under
    ``manifests/<model>/``. Objects already there with the right bytes are not written again.

    Returns:
        :class:`PublishResult` listing each object and whether it was written or already there.

    Raises:
        InputError: no folder or no valid manifest there (not a finished compile), a file the
            manifest lists is missing or has other bytes, a file in the folder is a link to one outside it, an S3/HTTP URL given as the store (only
            folders are written), a store inside the artifacts folder, or the store folder cannot be written.
    """
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    model = manifest.model["name"]  # a model name: read_manifest checked it
    own = _own_files(artifacts)
    if "://" not in str(store) and str(store).strip():
        where = Path(str(store)).expanduser().resolve()
        if where == artifacts.resolve() or artifacts.resolve() in where.parents:
            raise InputError(f"--store {store}: inside the artifacts folder {artifacts}, which the next compile "
                             "replaces (the store with it); choose a folder outside it")
    folder = _store_folder(store)
    files: list[StoredFile] = []
    listed: set[str] = {"manifest.json"}
    for art in manifest.artifacts:
        if art.status != "built" or not art.file:
            continue
        path = artifacts / art.file
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest as {art.id} but missing; compile again")
        files.append(_put(folder, path, art.sha256, "artifact", art.id))
        listed.add(art.file)
    eval_file = (manifest.eval or {}).get("file")
    if eval_file:
        path = artifacts / eval_file
        if not path.is_file():
            raise InputError(f"{path}: listed in the manifest as its eval set but missing; compile again")
        files.append(_put(folder, path, (manifest.eval or {}).get("sha256"), "eval", eval_file))
        listed.add(eval_file)
    for path in own:
        rel = path.relative_to(artifacts).as_posix()
        if rel in listed or any(part.startswith(".") for part in path.relative_to(artifacts).parts):
            continue  # hidden: staging folders and editor files are not part of a compile
        files.append(_put(folder, path, None, "file", rel))

    raw = (artifacts / "manifest.json").read_bytes()
    manifest_sha = hashlib.sha256(raw).hexdigest()
    mdir = folder / "manifests" / model
    try:
        mdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{mdir}: cannot create it in the store ({exc.strerror or exc})") from None
    rel = f"manifests/{model}"
    files.append(StoredFile("manifest", "manifest.json", manifest_sha, len(raw), f"{rel}/{manifest_sha}.json",
                            _write_if_new(mdir / f"{manifest_sha}.json", raw, manifest_sha)))
    index = json.dumps({"schema": "edgekit.store-files/1", "model": model, "manifest_sha256": manifest_sha,
                        "files": {f.name if f.kind != "artifact" else _file_of(manifest, f.name):
                                  {"sha256": f.sha256, "bytes": f.bytes, "kind": f.kind,
                                   **({"variant": f.name} if f.kind == "artifact" else {})} for f in files
                                  if f.kind != "manifest"}},
                       indent=2, sort_keys=True).encode() + b"\n"
    index_sha = hashlib.sha256(index).hexdigest()
    files.append(StoredFile("files", f"{manifest_sha}.files.json", index_sha, len(index),
                            f"{rel}/{manifest_sha}.files.json",
                            _write_if_new(mdir / f"{manifest_sha}.files.json", index, index_sha)))
    files.append(StoredFile("latest", "latest.json", manifest_sha, len(raw), f"{rel}/latest.json",
                            _write_if_new(mdir / "latest.json", raw, manifest_sha)))
    fsync_dir(folder / "sha256")
    return PublishResult(folder, model, manifest_sha, files)


def _own_files(artifacts: Path) -> list[Path]:
    """Return the files in the folder ``artifacts`` (recursively, sorted), every one of them its own.

    Raises:
        InputError: one is a link to a file outside the folder (publish would put that file in a store
            anyone may read): named, with what to do.
    """
    root = artifacts.resolve()
    files = sorted(p for p in artifacts.rglob("*") if p.is_file())
    for path in files:
        target = path.resolve()
        if target != root and root not in target.parents:
            raise InputError(f"{path}: a link to {target}, outside the artifacts folder; the store publishes every "
                             "file of the folder to whoever reaches it: remove the link or copy the file in")
    return files


def _file_of(manifest: Any, variant: str) -> str:
    art = manifest.artifact(variant)
    return art.file if art is not None and art.file else variant



def check_published(store_url: str, files: dict[str, int], timeout_s: float = 10.0) -> None:
    """Check that the store at ``store_url`` serves every ``{sha256: bytes}`` in ``files`` (HEAD
    requests, as devices will reach it from this host), before a rollout sends a device there.

    ``timeout_s`` bounds each connect and read; each answer as a whole gets three times that (a store
    trickling its headers a byte at a time cannot hold the caller).

    Raises:
        DeployError: the store does not answer (or not within three times ``timeout_s``), TLS fails (how
            to trust a private CA is said), answers an error status (404: the ``edgekit publish`` to run;
            5xx: its server), or an object is of another size (named).
    """
    import ssl
    import threading
    import urllib.error
    import urllib.request

    from device_agents.content_length import byte_count
    from device_agents.fetch import artifact_url
    from edge_kit.errors import DeployError

    def head(url: str) -> str | None:
        answer: dict[str, Any] = {}

        def ask() -> None:  # in a thread: urllib bounds each read, not the whole answer
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s) as resp:
                    answer["length"] = resp.headers.get("Content-Length")
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                answer["error"] = exc

        asker = threading.Thread(target=ask, daemon=True, name="store-check")  # a daemon: left if the store holds it
        asker.start()
        asker.join(3 * timeout_s)
        if asker.is_alive():
            raise DeployError(f"{url}: the store did not answer a HEAD request within {3 * timeout_s:.0f} s (it "
                              "sends too slowly); check the store's server or the proxy in front of it")
        if "error" in answer:
            raise answer["error"]
        return answer["length"]

    for sha, size in files.items():
        url = artifact_url(store_url, sha)
        try:
            length = head(url)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404, 410):  # not there (or hidden as not there): not published
                raise DeployError(f"{url}: the store answers HTTP {exc.code} {exc.reason}; publish the artifacts "
                                  f"first: edgekit publish ARTIFACTS --store <the folder behind {store_url}>") from None
            raise DeployError(f"{url}: the store answers HTTP {exc.code} {str(exc.reason)[:80]}; check the store's "
                              "server and its logs, then start again") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise DeployError(f"{store_url}: TLS failed ({getattr(reason, 'verify_message', None) or reason.reason or reason}); "
                                  "if the store's certificate is from a private CA (the devices' pull.ca_file), "
                                  "let this host trust it: SSL_CERT_FILE=<the CA's PEM> edgekit rollout ...") from None
            raise DeployError(f"{store_url}: the artifact store does not answer ({reason}); start it or fix --store") from None
        if length is not None and byte_count(length) != size:
            raise DeployError(f"{url}: the store holds {length[:40]} bytes, the manifest says {size}; publish again")
