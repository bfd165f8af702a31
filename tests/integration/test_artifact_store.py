"""The artifact store end to end: `edgekit publish` into a folder, nginx serving it, the agent's fetch.

nginx is Debian's nginx-light started on a free loopback port (edge_kit.sim.store_server); the
bytes it served come from its access log ($body_bytes_sent). The compiled folder is synthetic
(random bytes under a valid manifest): what is tested is the store, not the compiler.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from device_agents.fetch import (
    FetchError,
    artifact_url,
    download_once,
    fetch,
    partial_path,
)
from edge_kit.errors import InputError
from edge_kit.fleet.artifact_store import publish
from edge_kit.manifest import Artifact, Manifest
from edge_kit.sim.store_server import start_store_server

pytestmark = pytest.mark.integration  # nginx missing fails (.ci/setup installs nginx-light), never skips

SNDBUF = 16 * 1024  # nginx's send buffer: what a dropped connection had in flight stays small, as on a real link
IN_FLIGHT = 256 * 1024  # bound on bytes nginx counts as sent beyond what a cut client read


def compiled_folder(root: Path, sizes: dict[str, int], name: str = "tiny") -> Path:
    """Write a compiled model's folder: one random artifact per variant, an eval set, a calibration table."""
    folder = root / name
    folder.mkdir(parents=True)
    arts = []
    for variant, size in sizes.items():
        data = os.urandom(size)
        (folder / f"{variant}.tflite").write_bytes(data)
        arts.append(Artifact(id=variant, status="built", profiles=["rpi4"], summary=variant, precision=variant,
                             file=f"{variant}.tflite", sha256=hashlib.sha256(data).hexdigest(), bytes=size))
    arts.append(Artifact(id="edgetpu", status="not-built", reason="no compiler", profiles=["coral-usb"],
                         summary="edgetpu", precision="int8"))
    ev = os.urandom(5000)
    (folder / "eval.npz").write_bytes(ev)
    (folder / "trt-int8.calib").write_bytes(b"TRT-8601-EntropyCalibration2\n")
    (folder / ".tiny.staging-x").mkdir()  # hidden leftovers are not published
    manifest = Manifest(created="2026-11-29T00:00:00+00:00", model={"name": name, "format": "keras"},
                        eval={"file": "eval.npz", "sha256": hashlib.sha256(ev).hexdigest()},
                        versions={"edge-kit": "test"}, profiles={"rpi4": {}}, artifacts=arts)
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


@pytest.fixture
def published(tmp_path):
    folder = compiled_folder(tmp_path / "artifacts", {"fp32": 2_000_000, "int8": 600_000})
    store = tmp_path / "store"
    result = publish(folder, store)
    return folder, store, result


@pytest.fixture
def nginx(published, tmp_path):
    server = start_store_server(published[1], workdir=tmp_path / "nginx", sndbuf=SNDBUF, embedded=False)
    assert server.kind == "nginx"
    yield server
    server.stop()


def _sha(result, variant):
    return next(f.sha256 for f in result.files if f.kind == "artifact" and f.name == variant)


def test_publish_layout_then_fetch_every_object_through_nginx(published, nginx, tmp_path):
    folder, store, result = published
    kinds = sorted(f.kind for f in result.files)
    assert kinds == ["artifact", "artifact", "eval", "file", "files", "latest", "manifest"]
    assert all(f.written for f in result.files)
    index = json.loads((store / "manifests" / "tiny" / f"{result.manifest_sha256}.files.json").read_text())
    assert set(index["files"]) == {"fp32.tflite", "int8.tflite", "eval.npz", "trt-int8.calib"}
    for name, entry in index["files"].items():
        dest = tmp_path / "device" / entry["sha256"]
        r = fetch(artifact_url(nginx.url, entry["sha256"]), entry["sha256"], dest)
        assert r.bytes_downloaded == entry["bytes"] and dest.read_bytes() == (folder / name).read_bytes()
    with urllib.request.urlopen(f"{nginx.url}/manifests/tiny/latest.json", timeout=5) as resp:
        assert resp.read() == (folder / "manifest.json").read_bytes()
        assert resp.headers["Cache-Control"] == "no-cache"
    with urllib.request.urlopen(artifact_url(nginx.url, _sha(result, "int8")), timeout=5) as resp:
        assert "immutable" in resp.headers["Cache-Control"] and len(resp.read()) == 600_000
    assert nginx.bytes_served() == sum(e["bytes"] for e in index["files"].values()) + len(
        (folder / "manifest.json").read_bytes()) + 600_000


def test_a_cut_download_resumes_and_fetches_only_the_rest(published, nginx, tmp_path):
    _, store, result = published
    sha, size = _sha(result, "fp32"), 2_000_000
    url, dest = artifact_url(nginx.url, sha), tmp_path / "dev" / "fp32"
    dest.parent.mkdir()
    cut = download_once(url, partial_path(dest), cut_after=size // 2)
    assert not cut.complete and cut.received == size // 2
    r = fetch(url, sha, dest)
    assert r.resumed and r.bytes_downloaded == size - size // 2 and dest.read_bytes() == (store / "sha256" / sha).read_bytes()
    reqs = nginx.wait_requests(2)  # logged when each ends: the cut one may come second
    first, second = (next(q for q in reqs if q["range"] is None), next(q for q in reqs if q["range"]))
    print(f"cut at {size // 2}: nginx counted {first['bytes']} sent on the cut connection")
    assert second["range"] == f"bytes={size // 2}-" and second["status"] == 206
    assert second["bytes"] == size - size // 2  # the resume fetched exactly the rest
    assert size // 2 <= first["bytes"] <= size // 2 + IN_FLIGHT  # what the cut connection had in flight
    assert fetch(url, sha, dest).bytes_downloaded == 0 and len(nginx.requests()) == 2  # present: no request


def test_a_partial_left_from_an_earlier_boot_costs_only_the_rest(published, nginx, tmp_path):
    _, store, result = published
    sha = _sha(result, "fp32")
    dest = tmp_path / "fp32"
    partial_path(dest).write_bytes((store / "sha256" / sha).read_bytes()[:700_000])
    fetch(artifact_url(nginx.url, sha), sha, dest)
    assert nginx.wait_requests(1)[0]["bytes"] == nginx.bytes_served() == 2_000_000 - 700_000


def test_hash_mismatch_is_refused_and_leaves_nothing(published, nginx, tmp_path):
    _, store, result = published
    sha = _sha(result, "int8")
    (store / "sha256" / sha).write_bytes(os.urandom(600_000))  # the store's copy went bad
    dest = tmp_path / "int8"
    with pytest.raises(FetchError, match="sha256 mismatch") as exc:
        fetch(artifact_url(nginx.url, sha), sha, dest)
    assert "\n" not in str(exc.value) and artifact_url(nginx.url, sha) in str(exc.value)
    assert not dest.exists() and not partial_path(dest).exists()


def test_a_store_that_does_not_answer_is_one_line(published, nginx, tmp_path):
    sha = _sha(published[2], "int8")
    nginx.stop()
    with pytest.raises(FetchError, match=r"does not answer \(connection refused\).*fetch again") as exc:
        fetch(artifact_url(nginx.url, sha), sha, tmp_path / "x", timeout_s=3)
    assert "\n" not in str(exc.value)


def test_unpublished_hash_is_a_404_naming_publish(nginx, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404.*edgekit publish"):
        fetch(artifact_url(nginx.url, "ab" * 32), "ab" * 32, tmp_path / "x")


def test_bandwidth_cap_through_nginx(published, nginx, tmp_path):
    sha = _sha(published[2], "int8")
    rate = 1_000_000.0
    t0 = time.monotonic()
    fetch(artifact_url(nginx.url, sha), sha, tmp_path / "x", max_bytes_s=rate)
    measured = 600_000 / (time.monotonic() - t0)
    assert 0.85 * rate <= measured <= 1.05 * rate, measured


def test_a_server_that_ignores_range_restarts_from_zero(published, tmp_path):
    _, store, result = published
    sha = _sha(result, "fp32")
    with start_store_server(store, workdir=tmp_path / "norange", ignore_range=True, sndbuf=SNDBUF,
                            embedded=False) as server:
        url, dest = artifact_url(server.url, sha), tmp_path / "fp32"
        download_once(url, partial_path(dest), cut_after=500_000)
        r = fetch(url, sha, dest)
        assert not r.resumed and r.bytes_downloaded == 2_000_000
        assert dest.read_bytes() == (store / "sha256" / sha).read_bytes()
        assert [q["status"] for q in server.wait_requests(2)] == [200, 200]


def test_an_oversize_body_is_refused(published, nginx, tmp_path):
    sha = _sha(published[2], "fp32")
    dest = tmp_path / "fp32"
    with pytest.raises(FetchError, match="2000000 bytes, more than the 1000000 allowed"):
        fetch(artifact_url(nginx.url, sha), sha, dest, max_bytes=1_000_000)
    assert not dest.exists() and not partial_path(dest).exists()


def test_publish_twice_writes_nothing_new(published):
    folder, store, first = published
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = publish(folder, store)
    assert again.written == [] and len(again.present) == len(first.files)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before


def test_a_damaged_object_in_the_store_is_rewritten(published):
    folder, store, result = published
    sha = _sha(result, "int8")
    (store / "sha256" / sha).write_bytes(b"bad")
    again = publish(folder, store)
    assert [f.name for f in again.written] == ["int8"]
    assert hashlib.sha256((store / "sha256" / sha).read_bytes()).hexdigest() == sha


def test_an_artifact_changed_after_compiling_is_refused(published, tmp_path):
    folder = published[0]
    (folder / "int8.tflite").write_bytes(b"edited")
    with pytest.raises(InputError, match="differs from the manifest.*compile again"):
        publish(folder, tmp_path / "store2")


@pytest.mark.parametrize("where", ["../secret.key", "absolute"])
def test_a_manifest_file_outside_the_folder_is_refused_not_published(published, tmp_path, where):
    """Once `publish` (and `deploy`) read any path a manifest named: ../ or an absolute path went to the store."""
    folder = published[0]
    secret = tmp_path / "artifacts" / "secret.key"
    secret.write_bytes(b"operator's private key")
    data = json.loads((folder / "manifest.json").read_text())
    data["artifacts"][0]["file"] = str(secret) if where == "absolute" else where
    data["artifacts"][0]["sha256"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(data))
    store = tmp_path / "store2"
    with pytest.raises(InputError, match=r"manifest.json: artifacts.0.file: file '.*secret.key' is not a file name "
                                         r"inside the artifacts folder"):
        publish(folder, store)
    assert not (store / "sha256" / data["artifacts"][0]["sha256"]).exists()


def test_cli_publish_json_and_bad_input(published, run_cli, tmp_path):
    folder, store, _ = published
    code, out, err = run_cli("publish", folder, "--store", store, "--json")
    data = json.loads(out)
    assert code == 0 and data["written"] == 0 and data["already_there"] == 7 and data["model"] == "tiny"
    code, out, err = run_cli("publish", folder, "--store", tmp_path / "new")
    assert code == 0 and "7 written" in out and "already there" in out
    code, out, err = run_cli("publish", tmp_path / "nowhere", "--store", store)
    assert code != 0 and err.count("\n") == 1 and "no such folder" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli("publish", empty, "--store", store)
    assert code != 0 and err.count("\n") == 1 and "no manifest" in err
    code, out, err = run_cli("publish", folder, "--store", "s3://bucket/x")
    assert code != 0 and "aws s3 sync" in err and err.count("\n") == 1


def test_embedded_fallback_serves_ranges_too(published, tmp_path):
    _, store, result = published
    sha = _sha(result, "fp32")
    with start_store_server(store, embedded=True, sndbuf=SNDBUF) as server:
        url, dest = artifact_url(server.url, sha), tmp_path / "fp32"
        download_once(url, partial_path(dest), cut_after=1_000_000)
        r = fetch(url, sha, dest)
        assert r.resumed and r.bytes_downloaded == 1_000_000
        assert next(q for q in server.wait_requests(2) if q["range"])["bytes"] == 1_000_000
        # a Range of 5000 digits (over int()'s 4300): the handler died, no answer; now no Range: the whole file
        request = urllib.request.Request(url, headers={"Range": "bytes=" + "9" * 5000 + "-"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200 and len(answer.read()) == dest.stat().st_size


def test_store_server_errors_are_one_line(tmp_path):
    from edge_kit.errors import EdgeKitError

    with pytest.raises(EdgeKitError, match="no such store folder.*edgekit publish"):
        start_store_server(tmp_path / "missing")
    (tmp_path / "store").mkdir()
    with start_store_server(tmp_path / "store", embedded=False) as server:  # a temporary workdir, removed at stop
        with pytest.raises(EdgeKitError, match="already in use"):
            start_store_server(tmp_path / "store", port=server.port, embedded=False)  # the port is taken
        workdir = server.workdir
    assert not workdir.exists()


def test_https_store_with_the_fleet_ca_and_a_device_that_does_not_trust_it(published, tmp_path):
    import ssl

    from edge_kit.fleet.broker_setup import make_tls

    _, store, result = published
    sha = _sha(result, "int8")
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    with start_store_server(store, workdir=tmp_path / "tls-nginx", embedded=False, tls=tls) as server:
        url = artifact_url(server.url, sha)
        assert url.startswith("https://127.0.0.1:")
        r = fetch(url, sha, tmp_path / "int8", ssl_context=ssl.create_default_context(cafile=str(tls.ca)))
        assert r.bytes_downloaded == 600_000
        with pytest.raises(FetchError, match="TLS failed.*certificate") as exc:  # the system CAs do not know it
            fetch(url, sha, tmp_path / "other")
        assert "\n" not in str(exc.value)


def test_an_https_store_redirecting_to_plain_http_is_refused(published, tmp_path):
    """An https:// store (the operator chose TLS: the models are not to travel in the clear) answering a
    redirect to http:// (a misconfigured CDN, or anyone who can make it say so) used to be followed: the
    hash kept the bytes right, but the model crossed the network in the clear. Now it is one line, and
    nothing is fetched from the http:// address."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edge_kit.fleet.broker_setup import make_tls

    _, store, result = published
    sha = _sha(result, "int8")
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    with start_store_server(store, embedded=False) as plain:
        target = artifact_url(plain.url, sha)
        assert target.startswith("http://")

        class Redirect(BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        try:
            url = artifact_url(f"https://127.0.0.1:{server.server_address[1]}", sha)
            with pytest.raises(FetchError, match="redirected from https:// to http://") as exc:
                fetch(url, sha, tmp_path / "int8", ssl_context=ssl.create_default_context(cafile=str(tls.ca)))
            assert "\n" not in str(exc.value) and url in str(exc.value)
            assert not (tmp_path / "int8").exists() and not partial_path(tmp_path / "int8").exists()
        finally:
            server.shutdown()
            server.server_close()


def test_publish_refuses_a_link_to_a_file_outside_the_artifacts_folder(tmp_path):
    """Every file of the folder goes to the store, which any HTTP server may serve to anyone; a symlink in
    it (a compile output copied from elsewhere, a careless `ln -s`) to a file outside the folder used to
    publish that file (here a private key) under its hash, listed in the files index. Now the publish
    is refused before anything is written, naming the link."""
    folder = compiled_folder(tmp_path / "artifacts", {"int8": 1000})
    secret = tmp_path / "id_ed25519"
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "notes.txt").symlink_to(secret)
    store = tmp_path / "store"
    with pytest.raises(InputError, match=r"notes\.txt: a link to .*outside the artifacts folder") as exc:
        publish(folder, store)
    assert "\n" not in str(exc.value)
    assert not (store / "sha256").exists() or not any((store / "sha256").iterdir())  # nothing written
    (folder / "notes.txt").unlink()
    (folder / "notes.txt").symlink_to(folder / "eval.npz")  # a link inside the folder is the folder's own file
    assert publish(folder, store).model == "tiny"


def test_a_store_failing_with_a_server_error_at_rollout_start_says_so_not_publish(published, tmp_path):
    """`rollout start` checks the store first; a store answering 500 (its disk, its proxy) was told to
    publish the artifacts, which are there. A 404 still says publish; any other status names the store's
    server; a store that lies about the size (or states no size a number can hold) says publish again."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edge_kit.errors import DeployError
    from edge_kit.fleet.artifact_store import check_published

    _, store, result = published
    sha = _sha(result, "int8")
    answer = {"status": 500, "length": "600000"}

    class Store(BaseHTTPRequestHandler):
        def log_message(self, *_a):
            pass

        def do_HEAD(self):
            self.send_response(answer["status"])
            self.send_header("Content-Length", answer["length"])
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Store)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(DeployError, match=r"answers HTTP 500 .*check the store's server") as exc:
            check_published(url, {sha: 600_000})
        assert "publish" not in str(exc.value) and "\n" not in str(exc.value)
        answer["status"] = 404
        with pytest.raises(DeployError, match=r"answers HTTP 404 .*edgekit publish"):
            check_published(url, {sha: 600_000})
        answer.update(status=200, length="5")
        with pytest.raises(DeployError, match="holds 5 bytes, the manifest says 600000; publish again"):
            check_published(url, {sha: 600_000})
        for length in ("\u00b2", "9" * 5000):  # no count: int() raised a bare ValueError, no URL, no advice
            answer["length"] = length
            with pytest.raises(DeployError, match=f"holds {length[:40]} bytes, the manifest says 600000; publish again"):
                check_published(url, {sha: 600_000})
        answer["length"] = "600000"
        check_published(url, {sha: 600_000})
    finally:
        server.shutdown()
        server.server_close()


def test_a_disk_that_fills_mid_download_gets_its_space_back(published, nginx, tmp_path):
    """The agent checks the space before a download, but something else on the device can take it
    meanwhile. The partial used to be kept, holding the disk at its last byte (the device's other writers
    failing with it) until a later desired state happened to drop it. Now a download cut by a full disk
    deletes its partial: one line saying so, and the space is free again."""
    import shutil
    import subprocess

    sha = _sha(published[2], "fp32")  # 2 MB, on a 1 MB disk
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        free = shutil.disk_usage(disk).free
        dest = disk / "incoming" / sha
        with pytest.raises(FetchError, match=r"cannot write .*No space left on device.*deleted") as exc:
            fetch(artifact_url(nginx.url, sha), sha, dest)
        assert "\n" not in str(exc.value)
        assert not partial_path(dest).exists() and not dest.exists()
        assert shutil.disk_usage(disk).free == free  # the space is back
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_rollout_start_on_an_https_store_with_a_private_ca_says_how_the_host_trusts_it(published, tmp_path, monkeypatch):
    """The devices trust a private store CA by `pull.ca_file`; the host's check before a rollout used the
    system CAs and said `the artifact store does not answer (... CERTIFICATE_VERIFY_FAILED ...); start it`,
    though it answered. Now the line says TLS and how to make the host trust the CA, and that works."""
    from edge_kit.errors import DeployError
    from edge_kit.fleet.artifact_store import check_published
    from edge_kit.fleet.broker_setup import make_tls

    _, store, result = published
    sha = _sha(result, "int8")
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with start_store_server(store, workdir=tmp_path / "tls-nginx", embedded=False, tls=tls) as server:
        with pytest.raises(DeployError, match=r"TLS failed .*certificate.*SSL_CERT_FILE") as exc:
            check_published(server.url, {sha: 600_000})
        assert "does not answer" not in str(exc.value) and "\n" not in str(exc.value)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
        check_published(server.url, {sha: 600_000})


def test_a_store_trickling_its_answer_cannot_hold_rollout_start(published, trickling_http):
    """The host's check before a rollout asked each object with a HEAD whose every read had a timeout, but
    not the whole answer: a store (or proxy) sending its headers a byte every 0.2 s held `rollout start`
    for as long as it liked. Now the check gives up after three times its timeout, in one line."""
    from edge_kit.errors import DeployError
    from edge_kit.fleet.artifact_store import check_published

    sha = _sha(published[2], "int8")
    t0 = time.monotonic()
    with pytest.raises(DeployError, match=r"did not answer .* within 3 s") as exc:
        check_published(trickling_http, {sha: 600_000}, timeout_s=1.0)
    assert time.monotonic() - t0 < 6 and "\n" not in str(exc.value)


def test_an_empty_store_option_is_refused_not_the_current_folder(tmp_path, run_cli, monkeypatch):
    """`publish FOLDER --store ""` (an unset shell variable) wrote sha256/ and manifests/ into the current folder."""
    folder = compiled_folder(tmp_path / "artifacts", {"int8": 1000})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, err = run_cli("publish", folder, "--store", "", "--json")
    assert code == 2 and err == "edgekit: error: --store '': give the store folder, e.g. --store store\n"
    assert json.loads(out)["exit_code"] == 2 and list(cwd.iterdir()) == []


def test_a_store_inside_the_artifacts_folder_is_refused(tmp_path):
    """`publish artifacts/digits --store artifacts/digits/store` wrote the store into the compile's folder, which
    the next compile of that model replaces whole: the store devices fetch from would go with it."""
    folder = compiled_folder(tmp_path / "artifacts", {"int8": 1000})
    before = sorted(p.name for p in folder.iterdir())
    for store in (folder, folder / "store"):
        with pytest.raises(InputError, match="inside the artifacts folder .*choose a folder outside it"):
            publish(folder, store)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert publish(folder, tmp_path / "store").model == "tiny"


def test_a_store_inside_another_stores_folders_is_refused(published, tmp_path):
    """`publish ... --store store/sha256` (the folder devices fetch objects from) wrote a second store there:
    sha256/ and manifests/ folders among the first store's content-addressed objects."""
    folder, store, _ = published
    before = sorted(p.name for p in (store / "sha256").iterdir())
    for inner in (store / "sha256", store / "manifests", store / "manifests" / "tiny"):
        with pytest.raises(InputError, match=rf"--store {inner}: inside the store {store.resolve()} \(its "
                                             rf"(sha256|manifests)/ folder\).*; give --store {store.resolve()}$"):
            publish(folder, inner)
    assert sorted(p.name for p in (store / "sha256").iterdir()) == before
    assert not (store / "manifests" / "tiny" / "sha256").exists()
    assert publish(folder, store).model == "tiny"  # the store itself, as before
