"""The fleet's device key registry (``keys/devices.json``) on the operator's side."""

from __future__ import annotations

import json
import threading

import pytest

from device_agents.identity import Signer, encode_key
from edge_kit.errors import ConfigError
from edge_kit.fleet.keys import FleetKeys


def _public(_seed: int) -> bytes:
    """Return a new device public key (the argument only tells the calls apart)."""
    return Signer.generate().public


def test_registering_records_each_key_once_and_says_what_changed(tmp_path):
    keys = FleetKeys(tmp_path / "keys")
    a, b = _public(1), _public(2)
    assert keys.devices() == {}
    assert keys.register_many({"d1": a, "d2": b}) == 2
    assert keys.register("d1", a) is False  # the same key again: nothing rewritten
    assert keys.register("d1", b) is True
    assert keys.devices() == {"d1": b, "d2": b}
    data = json.loads((tmp_path / "keys" / "devices.json").read_text())
    assert data["d2"]["key"] == encode_key(b) and set(data["d2"]) == {"key", "key_id", "registered"}
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["devices.json"]  # no temporary file left


def test_concurrent_deploys_registering_devices_lose_none(tmp_path):
    keys = FleetKeys(tmp_path / "keys")
    publics = {f"d{i}": _public(i) for i in range(24)}
    threads = [threading.Thread(target=keys.register, args=(name, public)) for name, public in publics.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert keys.devices() == publics


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_damaged_registry_is_a_config_error_naming_it_when_read_and_when_registering(tmp_path, content):
    """Registering read the registry with its own json.loads: a damaged file raised JSONDecodeError (a
    traceback in the middle of a deploy) where reading the keys said which file to restore."""
    keys = FleetKeys(tmp_path / "keys")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "devices.json").write_text(content)
    for attempt in (keys.devices, lambda: keys.register("d1", _public(1))):
        with pytest.raises(ConfigError, match="devices.json"):
            attempt()
    assert (tmp_path / "keys" / "devices.json").read_text() == content  # left for the operator to restore
