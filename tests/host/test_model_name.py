"""One model-name rule (edgekit_protocol.messages.check_model_name) for every command that takes a compiled model:
publish, deploy and rollouts refuse a manifest whose name breaks it with the same one line, before any device or
store is touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edge_kit.manifest import Artifact, Manifest

RULE = ("manifest.json: model: model name 'my model' must be 1-128 letters, digits, '_', '.' or '-', starting with "
        "a letter or digit; compile the model again with --name NAME")


def compiled(tmp_path: Path, name: str) -> Path:
    """Write an artifacts folder with one built int8 artifact whose manifest names the model ``name``; return it."""
    folder = tmp_path / "art"
    folder.mkdir(parents=True)
    (folder / "int8.tflite").write_bytes(b"model")
    arts = [Artifact(id="int8", status="built", profiles=["rpi4"], summary="int8", precision="int8", file="int8.tflite",
                     sha256=hashlib.sha256(b"model").hexdigest(), bytes=5)]
    doc = json.loads(Manifest(created="2026-11-29T00:00:00+00:00", model={"name": "m"}, versions={},
                              profiles={"rpi4": {}}, artifacts=arts).to_json())
    doc["model"]["name"] = name  # as an older edge-kit wrote it for `compile "my model.tflite"`
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, profile: rpi4}\n"
                    "devices:\n  - {name: a, host: 127.0.0.1, port: 1}\n")
    return path


@pytest.mark.parametrize("command", ["publish", "deploy", "rollout"])
def test_a_manifest_naming_its_model_outside_the_rule_is_one_line_for_every_command(tmp_path, run_cli, command):
    """`compile "my model.tflite"` named the model 'my model'; publish refused it (its own 128-character rule),
    while deploy went on to the devices and `rollout start` planned desired states that named it."""
    folder, fleet = compiled(tmp_path, "my model"), fleet_file(tmp_path)
    argv = {"publish": ["publish", folder, "--store", tmp_path / "store"],
            "deploy": ["deploy", "--fleet", fleet, "--artifacts", folder],
            "rollout": ["rollout", "start", "--fleet", fleet, folder, "--store", "http://127.0.0.1:1"]}[command]
    code, _out, err = run_cli(*argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and RULE in err, err
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob("*.db"))  # nothing written


def test_the_longest_model_name_the_rule_takes_is_published(tmp_path, run_cli):
    folder = compiled(tmp_path, "m" * 128)
    code, out, err = run_cli("publish", folder, "--store", tmp_path / "store", "--json")
    assert code == 0 and json.loads(out)["model"] == "m" * 128, err
    code, _out, err = run_cli("publish", compiled(tmp_path / "x", "m" * 129), "--store", tmp_path / "store")
    assert code == 2 and "model name 'mmm" in err and "must be 1-128" in err


def test_a_manifest_file_name_ending_in_a_newline_is_refused():
    from edge_kit.manifest import _file_name

    with pytest.raises(ValueError):
        _file_name("fp32.tflite\n")


def test_the_publish_table_on_an_80_column_terminal_keeps_every_store_path_whole(tmp_path, run_cli, monkeypatch):
    """Found walking `edgekit publish` on an 80-column terminal: the store path column read
    'sha256/4c251…', so the object's name (what a device fetches) could not be read off the table."""
    from edge_kit.cli.app import out

    monkeypatch.setattr(out, "width", 80)
    folder = compiled(tmp_path, "m" * 40)
    code, text, err = run_cli("publish", folder, "--store", tmp_path / "store")
    assert code == 0, err
    table = text.split("\n" + "m" * 40 + ":")[0]  # the summary line under it shortens the manifest's hash on purpose
    assert "…" not in table
    joined = "".join(table.split())
    for line in json.loads(run_cli("publish", folder, "--store", tmp_path / "store", "--json")[1])["files"]:
        assert line["sha256"][:12] in joined and line["path"].split("/")[-1][-20:] in joined
