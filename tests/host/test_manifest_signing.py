"""Signed manifests: `edgekit sign` / `compile --sign-key`, and the fleet's `artifact_keys` checked by
deploy, tune and rollouts before any device is touched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from device_agents.identity import Signer, encode_key
from edge_kit.errors import ConfigError, InputError
from edge_kit.fleet.inventory import load_fleet
from edge_kit.loop.waves import RolloutSettings, plan_rollout
from edge_kit.manifest import (
    Artifact,
    ArtifactTrust,
    Manifest,
    read_manifest,
    sign_manifest,
)


def compiled(tmp_path: Path) -> Path:
    """Write an artifacts folder with one built int8 artifact and an unsigned manifest; return it."""
    folder = tmp_path / "art"
    folder.mkdir(parents=True)
    (folder / "int8.tflite").write_bytes(b"model")
    arts = [Artifact(id="int8", status="built", profiles=["rpi4"], summary="int8", precision="int8", file="int8.tflite",
                     sha256=hashlib.sha256(b"model").hexdigest(), bytes=5)]
    (folder / "manifest.json").write_text(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"},
                                                   versions={}, profiles={"rpi4": {}}, artifacts=arts).to_json())
    return folder


def fleet_file(tmp_path: Path, keys: list[str] | None) -> Path:
    """Write a fleet file of one rpi4 device nothing listens for, ``artifact_keys`` when given; return it."""
    path = tmp_path / "fleet.yaml"
    path.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                    "devices:\n  - {name: a, host: 127.0.0.1, port: 1}\n"
                    + (f"artifact_keys: {json.dumps(keys)}\n" if keys is not None else ""))
    return path


def test_a_signed_manifest_verifies_and_any_change_after_signing_is_refused(tmp_path):
    folder, signer = compiled(tmp_path), Signer.generate()
    unsigned = (folder / "manifest.json").read_text()
    assert '"key_id"' not in unsigned and '"sig"' not in unsigned  # an unsigned manifest carries no empty fields
    assert read_manifest(folder, ArtifactTrust()).signature == "unsigned"
    signed = sign_manifest(folder, signer)
    assert signed.key_id == signer.key_id and signed.signature == f"signed by key {signer.key_id} (trusted)"
    trust = ArtifactTrust((signer.public,), required=True)
    assert read_manifest(folder, trust).signature.endswith("(trusted)")
    # a signature by a key nobody listed is no guarantee: said, and refused where signatures are required
    assert "not checked" in read_manifest(folder, ArtifactTrust()).signature
    with pytest.raises(InputError, match=f"signed by key '{signer.key_id}', which this fleet does not trust"):
        read_manifest(folder, ArtifactTrust((Signer.generate().public,), required=True))
    path = folder / "manifest.json"
    for change in (lambda d: d["artifacts"][0].update(sha256="0" * 64),  # another model under the same name
                   lambda d: d["model"].update(name="n"), lambda d: d.update(sig=d["sig"][:-4] + "AAA=")):
        doc = json.loads(signed_text := path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(InputError, match="does not verify: the manifest changed after it was signed"):
            read_manifest(folder, ArtifactTrust((signer.public,)))  # trusted key: checked even when not required
        path.write_text(signed_text)
    path.write_text(unsigned)
    with pytest.raises(InputError, match=r"not signed, and this fleet takes only signed manifests .*edgekit sign"):
        read_manifest(folder, trust)


def test_deploy_and_rollouts_refuse_what_the_fleets_artifact_keys_do_not_vouch_for(tmp_path, run_cli):
    folder, signer = compiled(tmp_path), Signer.generate()
    (tmp_path / "release.pub").write_text(encode_key(signer.public) + "\n")
    fleet = load_fleet(fleet_file(tmp_path, ["release.pub"]))  # a file beside the fleet file, or the key itself
    assert fleet.artifact_trust().keys == (signer.public,) and fleet.artifact_trust().required
    code, out, err = run_cli("deploy", "--fleet", str(fleet_file(tmp_path, ["release.pub"])), "--artifacts", str(folder))
    assert code == 2 and "manifest.json: not signed" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(InputError, match="not signed"):
        plan_rollout("r", folder, fleet, fleet.devices, "http://s", None, RolloutSettings())
    key = tmp_path / "release.key"
    signer.save(key)
    code, out, err = run_cli("sign", str(folder), "--key", str(key), "--json")
    assert code == 0 and json.loads(out)["key_id"] == signer.key_id
    plan = plan_rollout("r", folder, fleet, fleet.devices, "http://s", None, RolloutSettings())
    assert plan["signature"] == f"signed by key {signer.key_id} (trusted)"  # recorded with the rollout
    # without artifact_keys an unsigned manifest is taken, and says so
    assert plan_rollout("r", compiled(tmp_path / "x"), load_fleet(fleet_file(tmp_path, None)), fleet.devices,
                        "http://s", None, RolloutSettings())["signature"] == "unsigned"


def test_bad_artifact_keys_and_signing_keys_are_one_line_errors(tmp_path, run_cli):
    with pytest.raises(ConfigError, match=r"fleet.yaml: artifact_keys\[0\]: not an Ed25519 public key"):
        load_fleet(fleet_file(tmp_path, ["not-a-key"])).artifact_trust()
    folder = compiled(tmp_path)
    before = (folder / "manifest.json").read_bytes()
    loose = tmp_path / "loose.key"
    Signer.generate().save(loose)
    loose.chmod(0o644)
    for key, why in ((tmp_path / "none.key", "No such file"), (loose, "readable by others"),
                     (folder / "int8.tflite", "not an unencrypted Ed25519 private key")):  # mode 644: not a key first
        code, out, err = run_cli("sign", str(folder), "--key", str(key))
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err
        # a release key given to sign is never to be removed "for a new one": nothing makes one here
        assert "remove it" not in err, err
    assert (folder / "manifest.json").read_bytes() == before  # nothing written


def test_deploy_ships_only_the_eval_set_the_signed_manifest_lists(tmp_path):
    """An eval.npz dropped beside a manifest that lists none carries metric code nothing vouches for: before,
    the deploy uploaded it with its own sha256 as the expected one; now it is not shipped."""
    from edge_kit.fleet.deploy import DeployOptions, _Deployer

    folder, signer = compiled(tmp_path), Signer.generate()
    (folder / "eval.npz").write_bytes(b"someone else's metric")
    trust = ArtifactTrust((signer.public,), required=True)
    manifest = read_manifest(sign_manifest(folder, signer) and folder, trust)
    assert manifest.eval is None
    assert _Deployer(None, DeployOptions(folder), manifest, None, None).eval_sha256 is None
    # the eval set the manifest lists is shipped, under the sha256 the signature covers
    manifest = manifest.model_copy(update={"eval": {"file": "eval.npz",
                                                    "sha256": hashlib.sha256(b"someone else's metric").hexdigest()}})
    assert _Deployer(None, DeployOptions(folder), manifest, None, None).eval_sha256 == manifest.eval["sha256"]


def test_a_canary_rollout_deploys_the_one_manifest_it_checked(tmp_path, monkeypatch):
    """The manifest replaced by another one the fleet trusts while the canaries run: before, the rest got
    the new release (each deploy read the folder again), not the one the canaries were judged on."""
    from edge_kit.fleet.deploy import DeployOptions, DeviceResult, GroupResult
    from edge_kit.fleet.inventory import Device
    from edge_kit.loop import rollout as ro

    folder, signer = compiled(tmp_path), Signer.generate()
    (tmp_path / "release.pub").write_text(encode_key(signer.public) + "\n")
    fleet = load_fleet(fleet_file(tmp_path, ["release.pub"]))
    sign_manifest(folder, signer)
    devices = [Device(name=n, host="127.0.0.1", user="u", profile="rpi4") for n in ("a", "b")]
    shipped = []

    def fake_deploy(_fleet, targets, _opts, _progress=None, manifest=None):
        shipped.append(manifest and manifest.artifacts[0].sha256)
        doc = json.loads((folder / "manifest.json").read_text())  # another release, signed by the same key
        doc["artifacts"][0]["sha256"] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(doc))
        sign_manifest(folder, signer)
        return GroupResult([DeviceResult(d.name, "succeeded", activated=True, variant="int8") for d in targets])

    monkeypatch.setattr(ro, "deploy", fake_deploy)
    monkeypatch.setattr(ro, "broken_constraints", lambda *_a: None)
    ro.rollout(fleet, devices, DeployOptions(folder), canary=0.5)
    assert shipped == [hashlib.sha256(b"model").hexdigest()] * 2


def test_signing_a_manifest_holding_nan_is_a_one_line_error(tmp_path, run_cli):
    """JSON from elsewhere may hold NaN or Infinity, which the signature's canonical JSON has no form for:
    before, `edgekit sign` ended in a ValueError traceback; now one line names the file and the field."""
    folder, key = compiled(tmp_path), tmp_path / "release.key"
    Signer.generate().save(key)
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    doc["artifacts"][0]["build_seconds"] = float("inf")
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    code, _out, err = run_cli("sign", str(folder), "--key", str(key))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "manifest.json: artifacts.0.build_seconds is NaN or an infinity" in err
    assert path.read_bytes() == before


def test_an_artifact_keys_file_that_holds_no_public_key_is_named_with_what_it_is(tmp_path):
    """Before, a binary file (a DER key) ended in a UnicodeDecodeError traceback, and a private key, a folder or
    a mistyped file name all said only "not an Ed25519 public key", naming neither the file nor the mistake; and a
    FIFO was "no such file" (or, named without a dot, "not an Ed25519 public key"): it is there, but no regular file."""
    Signer.generate().save(tmp_path / "release.key")
    (tmp_path / "release.der").write_bytes(bytes(range(256)))
    (tmp_path / "keys.d").mkdir()
    os.mkfifo(tmp_path / "release.pub")
    os.mkfifo(tmp_path / "releasekey")
    for entry, why in (("release.key", r"release.key is a private key; list its public half"),
                       ("release.der", r"release.der: not an Ed25519 public key"),
                       ("keys.d", r"keys.d: a folder; give a file holding an Ed25519 public key"),
                       ("relase.pub", r"relase.pub: no such file"),
                       ("release.pub", r"release.pub: not a regular file; give a file holding an Ed25519 public key"),
                       ("releasekey", r"releasekey: not a regular file; give a file holding an Ed25519 public key")):
        with pytest.raises(ConfigError, match=r"fleet.yaml: artifact_keys\[0\]: .*" + why):
            load_fleet(fleet_file(tmp_path, [entry])).artifact_trust()


def test_a_manifest_nested_deep_is_a_one_line_error_not_a_recursion_error(tmp_path, run_cli):
    """Valid JSON nested hundreds or thousands deep ended `edgekit sign` (and deploy's signature check, and
    publish) in a RecursionError or ValueError traceback; now it is refused as unreadable, naming the file."""
    folder, key = compiled(tmp_path), tmp_path / "release.key"
    signer = Signer.generate()
    signer.save(key)
    path = folder / "manifest.json"
    good = json.loads(path.read_text())
    for depth in (900, 100_000):
        path.write_text(json.dumps({**good, "key_id": signer.key_id, "sig": "AAAA"})
                        .replace('"name": "m"', '"name": "m", "x": ' + "[" * depth + "]" * depth))
        with pytest.raises(InputError, match="manifest.json: unreadable manifest .nested more than 64 deep"):
            read_manifest(folder, ArtifactTrust((signer.public,)))
        code, _out, err = run_cli("sign", str(folder), "--key", str(key))
        assert code == 2 and "unreadable manifest (nested more than 64 deep)" in err and len(err.strip().splitlines()) == 1


def test_a_sig_that_names_no_key_is_said_so(tmp_path):
    """A manifest with a sig and no key_id was reported as "signed by key None" (and, where signatures are
    required, refused as signed by a key 'None' the fleet does not trust)."""
    folder, signer = compiled(tmp_path), Signer.generate()
    sign_manifest(folder, signer)
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    del doc["key_id"]
    path.write_text(json.dumps(doc))
    assert read_manifest(folder, ArtifactTrust()).signature == "signed without a key_id, not checked"
    with pytest.raises(InputError, match=r"manifest.json: its sig names no key \(no key_id\), and this fleet takes only"):
        read_manifest(folder, ArtifactTrust((signer.public,), required=True))


def test_a_built_artifact_without_a_sha256_is_not_deployed(tmp_path, run_cli):
    """A manifest whose built artifact has no sha256 (edited, or from elsewhere) was deployed: the device checks
    the upload only against the sha256 it is given, so any bytes were installed. Now the deploy stops first."""
    folder = compiled(tmp_path)
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    doc["artifacts"][0]["sha256"] = None
    path.write_text(json.dumps(doc))
    code, _out, err = run_cli("deploy", "--fleet", str(fleet_file(tmp_path, None)), "--artifacts", str(folder))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "manifest.json: int8 is built but names no sha256, so nothing could check what a device installs" in err


def test_a_signing_key_given_as_a_folder_is_named_a_folder(tmp_path, run_cli):
    """`sign --key FOLDER` said 'a private key readable by others; chmod 600 it' (a folder is drwxr-xr-x): a chmod
    that could not help. Now it says it is a folder, and nothing is written."""
    folder = compiled(tmp_path)
    before = (folder / "manifest.json").read_text()
    (tmp_path / "keys").mkdir()
    code, out, err = run_cli("sign", str(folder), "--key", str(tmp_path / "keys"), "--json")
    assert code == 2 and err.count("\n") == 1
    assert json.loads(out)["error"] == (f"{tmp_path / 'keys'}: a folder, not a key file; give an Ed25519 private key in "
                                        "PEM (e.g. the fleet's keys/operator.key)")
    assert (folder / "manifest.json").read_text() == before


def test_a_signing_key_given_as_a_fifo_is_one_line_never_a_wait(tmp_path):
    """The one reader of signing keys (Signer.load: `sign --key`, `compile --sign-key`, the operator key) opens a key
    without waiting for a writer: a FIFO is named in one line (a plain open would hold the command for ever)."""
    import os
    import subprocess
    import sys

    folder = compiled(tmp_path)
    os.mkfifo(tmp_path / "key.pem", 0o600)
    code = "import sys; sys.argv = ['edgekit', *sys.argv[1:]]; from edge_kit.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "sign", str(folder), "--key", str(tmp_path / "key.pem")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == (f"edgekit: error: {tmp_path / 'key.pem'}: not a regular file; "
                                                        "give an Ed25519 private key in PEM (e.g. the fleet's "
                                                        "keys/operator.key)\n")


@pytest.mark.parametrize("edit, said", [
    (lambda doc: doc["artifacts"][0].pop("file"), "int8 is built but names no file, so nothing could check"),
    (lambda doc: doc["artifacts"][0].pop("sha256"), "int8 is built but names no sha256, so nothing could check"),
    (lambda doc: doc["artifacts"].append(dict(doc["artifacts"][0])), "artifacts.1.id: variant int8 is listed twice"),
    (lambda doc: doc["artifacts"][0].update(bytes=-5), "artifacts.0.bytes: -5 is not a size in bytes (a whole number "
                                                       "below 1 TiB); compile the model again"),
    (lambda doc: doc["artifacts"][0].update(bytes=5.5), "artifacts.0.bytes: 5.5 is not a size in bytes"),
    (lambda doc: doc["artifacts"][0].update(bytes="5"), "artifacts.0.bytes: '5' is not a size in bytes"),
    (lambda doc: doc["artifacts"][0].update(gzip_bytes=True), "artifacts.0.gzip_bytes: True is not a size in bytes"),
    (lambda doc: doc["artifacts"][0].update(bytes=10 ** 29), "artifacts.0.bytes: 100000000000000000000000000000 is not"),
    (lambda doc: doc["model"].pop("name"), "model: name is missing; compile the model again with --name NAME"),
])
def test_publish_refuses_a_manifest_with_a_variant_unchecked_listed_twice_or_of_no_size_or_model_name(
        tmp_path, run_cli, edit, said):
    """An edited manifest (a built variant without its file or sha256, or a variant listed twice) was published, exit
    0: the variant without a file silently left out of the store, the one without a sha256 stored unchecked, the
    twice-listed one a guess; only deploy checked. So were bytes of -5, 5.5, "5", true or 1e29 (pydantic read "5" and
    true as ints), and one without model.name was refused as 'model name None'. Now every reader of a manifest
    refuses it in one line naming the file and field, nothing stored."""
    folder = compiled(tmp_path)
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    store = tmp_path / "store"
    code, out, err = run_cli("publish", str(folder), "--store", str(store), "--json")
    assert code == 2 and err == f"edgekit: error: {json.loads(out)['error']}\n"
    assert err.startswith(f"edgekit: error: {path}: {said}") and not store.exists()
