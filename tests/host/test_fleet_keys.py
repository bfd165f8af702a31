"""The fleet's device key registry (``keys/devices.json``) on the operator's side."""

from __future__ import annotations

import json
import threading

import pytest

from device_agents.identity import Signer, encode_key
from edge_kit.errors import ConfigError, InputError
from edge_kit.fleet.keys import FleetKeys, KeyRevoked


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


A_KEY = "E0K+obYypi/mUey1s4zvOwei2ts2MfrVkPYNB14i02U="  # a well-formed public key, so that the NaN beside it is the damage


@pytest.mark.parametrize("content", ["{not json", "[1, 2]",
                                     '{"d1": {"key": "%s", "registered": NaN}}' % A_KEY])
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


def _signed(signer: Signer, device: str) -> dict:
    from edgekit_protocol import messages

    return signer.sign(messages.envelope("status", "f", device, 0, {"state": "online"}))


def test_a_reprovisioned_device_s_old_key_is_refused_even_within_one_tick_of_the_file_clock(tmp_path):
    """The keyring re-read the registry only when its mtime changed: a device re-provisioned within the
    same tick of the file clock (or with its mtime restored by a backup tool) kept its old, revoked key
    trusted until the next change. A rewrite is a rename, so the new inode is noticed now."""
    import os

    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    old, new = Signer.generate(), Signer.generate()
    keys.register("d1", old.public)
    keyring = keys.keyring()
    keyring.verify(_signed(old, "d1"), "d1")
    before = keys.registry.stat()
    keys.register("d1", new.public)
    os.utime(keys.registry, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
    with pytest.raises(MessageError, match="not d1's registered key"):
        keyring.verify(_signed(old, "d1"), "d1")
    keyring.verify(_signed(new, "d1"), "d1")


@pytest.mark.parametrize("damage", ["", '{"d1": {"key": "trunc', "[]"])
def test_a_registry_damaged_while_receivers_run_keeps_the_keys_last_read_and_says_so(tmp_path, damage, caplog):
    """A registry truncated or damaged under a running monitor made every device's message unverifiable:
    all were refused (kept as invalid, acknowledged, lost from the history). The keys last read stay
    in force, one error names the file; a registry unreadable from the start is still refused."""
    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    d1 = Signer.generate()
    keys.register("d1", d1.public)
    keyring = keys.keyring()
    keyring.verify(_signed(d1, "d1"), "d1")
    keys.registry.write_text(damage)
    for _ in range(3):
        keyring.verify(_signed(d1, "d1"), "d1")
    errors = [r for r in caplog.records if "devices.json" in r.getMessage()]
    assert len(errors) == 1 and "as last read" in errors[0].getMessage()
    with pytest.raises(MessageError, match="no key is registered for d2"):
        keyring.verify(_signed(Signer.generate(), "d2"), "d2")  # nobody gains a key from the damage
    with pytest.raises(ConfigError, match="devices.json"):
        keys.keyring().verify(_signed(d1, "d1"), "d1")  # never read whole: refused, naming the file

def test_messages_from_unregistered_device_names_do_not_reread_the_registry_each_time(tmp_path, monkeypatch):
    """Every message naming an unregistered device re-read and parsed the whole registry: a flood of made-up
    device names cost a registry parse per message. Now at most once a second while the file is unchanged."""
    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    keys.register_many({f"d{i}": _public(i) for i in range(50)})
    keyring = keys.keyring()
    reads = []
    real = FleetKeys.devices
    monkeypatch.setattr(FleetKeys, "devices", lambda self: reads.append(1) or real(self))
    stranger = Signer.generate()
    for i in range(200):
        with pytest.raises(MessageError, match="no key is registered"):
            keyring.verify(_signed(stranger, f"x{i}"), f"x{i}")
    assert len(reads) <= 2
    late = Signer.generate()
    keys.register("late", late.public)  # a device registered now is known at once (the file changed)
    keyring.verify(_signed(late, "late"), "late")


def test_a_deploy_cut_off_while_giving_a_device_its_key_never_leaves_it_without_a_provisioning_floor(tmp_path):
    """provisioned.json is written only with a new key. It was written after the key: a deploy cut off between
    them left a device with a key and no floor, and every later deploy, seeing the key, never wrote one."""
    from types import SimpleNamespace

    from device_agents.identity import PROVISIONED
    from edge_kit.errors import DeployError
    from edge_kit.fleet.agent_install import _ensure_identity

    fleet = SimpleNamespace(key_store=lambda: FleetKeys(tmp_path / "keys"))
    for cut in ("device.key", "device.pub", PROVISIONED):
        written: dict[str, bytes] = {}

        def put(data, path, mode=None, cut=cut, written=written):
            if written.get("cut") is None and path.endswith(cut):
                written["cut"] = b""
                raise DeployError(f"{path}: connection lost")
            written[path.rsplit("/", 1)[1]] = data

        for _deploy in range(2):
            info = {"device_pub": written.get("device.pub", b"").decode().strip() or None,
                    "has_device_key": "device.key" in written, "operators_sha256": None}
            shell = SimpleNamespace(info=info, root="/r", dev=SimpleNamespace(name=f"d-{cut}"), put=put)
            try:
                _ensure_identity(shell, fleet, lambda: None)
            except DeployError:
                pass
        assert {"device.key", PROVISIONED} <= set(written), cut


def test_an_operator_key_readable_by_others_is_told_to_be_chmod_ed_never_removed(tmp_path):
    """The fleet's operator key, readable by others, said 'chmod 600 it (or remove it for a new one)': removing it
    made a new operator key that every device refuses (commands, desired states) until each is deployed again."""
    keys = FleetKeys(tmp_path / "keys")
    first = keys.operator
    (tmp_path / "keys" / "operator.key").chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        FleetKeys(tmp_path / "keys").operator
    said = str(caught.value)
    assert said == (f"{tmp_path / 'keys' / 'operator.key'}: a private key readable by others; chmod 600 it (do not "
                    "remove it: every device trusts this key and would refuse a new one; `edgekit keys rotate` "
                    "replaces it)")
    assert "remove it for a new one" not in said and (tmp_path / "keys" / "operator.key").exists()
    (tmp_path / "keys" / "operator.key").chmod(0o600)
    assert FleetKeys(tmp_path / "keys").operator.public == first.public


def test_a_lost_operator_key_is_never_replaced_silently(tmp_path):
    """keys/ copied to another machine without operator.key (it holds secrets: kept out of git): the first command
    made a new operator key, and every device refused everything it signed, silently (the host only saw them not
    answer). Now it is one line saying what to do, receivers still verify with the public half the devices pin, and
    `deploy --new-operator-key` makes one on purpose. A fleet whose devices were registered before any operator key
    was made (a virtual fleet) still gets one on first use."""
    new_fleet = FleetKeys(tmp_path / "virtual")
    new_fleet.register_many({"v0": _public(0)})
    assert new_fleet.lost_operator() is None and FleetKeys(tmp_path / "virtual").keyring().operators
    keys = FleetKeys(tmp_path / "keys")
    first = keys.operator  # a new fleet: made on first use, its public half kept beside it
    assert (tmp_path / "keys" / "operator.pub").read_text() == encode_key(first.public) + "\n"
    keys.register_many({f"d{i}": _public(i) for i in range(5)})
    (tmp_path / "keys" / "operator.key").unlink()
    with pytest.raises(ConfigError) as caught:
        FleetKeys(tmp_path / "keys").operator
    said = str(caught.value)
    assert said.startswith(f"{tmp_path / 'keys' / 'operator.key'}: missing, and {tmp_path / 'keys' / 'operator.pub'} "
                           "says the fleet had one") and "--new-operator-key" in said and "\n" not in said
    assert not (tmp_path / "keys" / "operator.key").exists()  # nothing made
    assert FleetKeys(tmp_path / "keys").keyring().operators == (first.public,)  # a monitor still verifies
    new = FleetKeys(tmp_path / "keys").new_operator()
    assert new.public != first.public and FleetKeys(tmp_path / "keys").operator.public == new.public
    assert (tmp_path / "keys" / "operator.pub").read_text() == encode_key(new.public) + "\n"
    with pytest.raises(ConfigError, match="there already: --new-operator-key makes one only where it is lost"):
        FleetKeys(tmp_path / "keys").new_operator()
    assert FleetKeys(tmp_path / "keys").operator.public == new.public


def test_a_revoked_key_moves_to_the_revoked_list_and_every_receiver_refuses_it_as_revoked(tmp_path):
    """`Remove its key from keys/devices.json` was the only way to stop a compromised device, and the next deploy
    registered the key it holds again. Revoking moves the key to keys/revoked.json: refused as revoked, at once."""
    import os

    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    d1, d2 = Signer.generate(), Signer.generate()
    keys.register_many({"d1": d1.public, "d2": d2.public})
    keyring = keys.keyring()
    keyring.verify(_signed(d1, "d1"), "d1")
    entry, newly = keys.revoke("d1", "stolen from the warehouse")
    assert newly and entry["device"] == "d1" and entry["key"] == encode_key(d1.public) and entry["reason"] == "stolen from the warehouse"
    assert set(keys.devices()) == {"d2"}
    assert [e["key_id"] for e in keys.revoked()] == [entry["key_id"]]
    assert keys.revoked_file.stat().st_mode & 0o777 == keys.registry.stat().st_mode & 0o777
    with pytest.raises(MessageError, match=r"d1's key [0-9a-f]{16} was revoked on \d{4}-\d\d-\d\d .*stolen.*refused"):
        keyring.verify(_signed(d1, "d1"), "d1")  # the running receiver re-read it (the files were replaced)
    with pytest.raises(MessageError, match="revoked"):
        keys.keyring().verify(_signed(Signer.generate(), "d1"), "d1")  # any key on its topic: the device is revoked
    keyring.verify(_signed(d2, "d2"), "d2")
    assert keys.revoked_devices() == {"d1": keys.revoked()[0]}
    again, newly = keys.revoke("d1", "again")  # idempotent: nothing rewritten
    before = [os.stat(p).st_ino for p in (keys.registry, keys.revoked_file)]
    again, newly = keys.revoke("d1", "again")
    assert not newly and again["reason"] == "stolen from the warehouse"
    assert [os.stat(p).st_ino for p in (keys.registry, keys.revoked_file)] == before
    with pytest.raises(InputError, match=r"nope: no key is registered for it in .*devices.json and none was revoked"):
        keys.revoke("nope")
    assert len(keys.revoked()) == 1 and set(keys.devices()) == {"d2"}


def test_a_revoked_key_is_never_registered_again_and_a_new_key_brings_the_device_back(tmp_path):
    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    old, new = Signer.generate(), Signer.generate()
    keys.register("d1", old.public)
    keys.revoke("d1")
    with pytest.raises(KeyRevoked, match=r"^d1: its key [0-9a-f]{16} was revoked on \d{4}-\d\d-\d\d \d\d:\d\d UTC: "
                                         "re-image it or run deploy with --new-key to give it a fresh key pair$"):
        keys.register("d1", old.public)
    with pytest.raises(KeyRevoked):
        keys.register_many({"d2": Signer.generate().public, "d1": old.public})  # nothing of the batch is written
    assert keys.devices() == {}
    assert keys.register("d1", new.public)
    keyring = keys.keyring()
    keyring.verify(_signed(new, "d1"), "d1")
    with pytest.raises(MessageError, match="revoked"):
        keyring.verify(_signed(old, "d1"), "d1")  # the thief's key stays refused
    assert keys.revoked_devices() == {} and len(keys.revoked()) == 1


def test_a_revocation_cut_off_between_its_two_writes_already_refuses_the_key_and_revoking_again_finishes(tmp_path,
                                                                                                         monkeypatch):
    from edge_kit.fleet import keys as keys_module
    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    d1 = Signer.generate()
    keys.register("d1", d1.public)
    keyring = keys.keyring()
    keyring.verify(_signed(d1, "d1"), "d1")
    real = keys_module.atomic_write_text

    def cut(path, text):
        if path == keys.registry:
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(keys_module, "atomic_write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        keys.revoke("d1", "lost")
    monkeypatch.setattr(keys_module, "atomic_write_text", real)
    assert set(json.loads(keys.registry.read_text())) == {"d1"}  # still listed there ...
    with pytest.raises(MessageError, match="revoked"):
        keyring.verify(_signed(d1, "d1"), "d1")  # ... and refused all the same
    with pytest.raises(KeyRevoked):
        keys.register("d1", d1.public)
    assert keys.revoked_devices().keys() == {"d1"}
    entry, newly = keys.revoke("d1", "lost")
    assert newly and keys.devices() == {} and len(keys.revoked()) == 1 and entry["reason"] == "lost"
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["devices.json", "operator.key", "operator.pub",
                                                                     "revoked.json"]


@pytest.mark.parametrize("content", ["{not json", "{}", '[{"device": "d1", "key": "short"}]',
                                     '[{"device": "d1", "key": "%s", "revoked": NaN}]' % A_KEY])
def test_a_damaged_revoked_list_is_a_config_error_naming_it(tmp_path, content):
    keys = FleetKeys(tmp_path / "keys")
    keys.register("d1", Signer.generate().public)
    keys.revoked_file.write_text(content)
    for attempt in (keys.revoked, lambda: keys.revoke("d1"), lambda: keys.register("d2", _public(2))):
        with pytest.raises(ConfigError, match="revoked.json"):
            attempt()
    assert keys.revoked_file.read_text() == content and set(keys.devices()) == {"d1"}


_SLOW_REVOKE = r"""
import sys, time
from pathlib import Path
from edge_kit.fleet import keys as keys_module

real = keys_module.atomic_write_text

def slow(path, text):  # another command's revocation, between its read and its writes when the parent acts
    print("read", flush=True)
    time.sleep(1.5)
    real(path, text)
    keys_module.atomic_write_text = real

keys_module.atomic_write_text = slow
keys_module.FleetKeys(Path(sys.argv[1])).revoke("d1", "lost")
"""


def test_two_commands_revoking_two_devices_at_once_lose_neither_revocation(tmp_path):
    """The registry and the revoked list were guarded by a thread lock only: two `edgekit fleet revoke` (or a revoke
    and a deploy) at once each read both files, then each wrote its own update over the other's. Revoking d1 in one
    process and d2 in another left revoked.json listing d1 alone and devices.json holding d2: d2 trusted again."""
    import os
    import subprocess
    import sys

    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    d1, d2 = Signer.generate(), Signer.generate()
    keys.register_many({"d1": d1.public, "d2": d2.public})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_REVOKE, str(keys.folder)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout.readline().strip() == "read"  # the other command has read both files, not yet written
        keys.revoke("d2", "stolen")  # waits for the other one to finish, then reads what it wrote
    finally:
        assert child.wait(60) == 0
    assert {e["device"] for e in keys.revoked()} == {"d1", "d2"} and keys.devices() == {}
    keyring = keys.keyring()
    for signer, name in ((d1, "d1"), (d2, "d2")):
        with pytest.raises(MessageError, match="revoked"):
            keyring.verify(_signed(signer, name), name)


def test_a_new_key_cut_off_between_its_private_and_public_halves_is_given_again_never_registered_stale(tmp_path):
    """`deploy --new-key` wrote device.key, then device.pub: cut off in between, the device held the new private key
    and the old public one. The next deploy (without --new-key: the old key was not revoked) registered the old public
    key it read there, and every message the agent signed with the new key was refused as forged."""
    from types import SimpleNamespace

    from edge_kit.errors import DeployError
    from edge_kit.fleet.agent_install import _ensure_identity

    keys = FleetKeys(tmp_path / "keys")
    old = Signer.generate()
    keys.register("d1", old.public)
    device = {"device.key": old.pem(), "device.pub": (encode_key(old.public) + "\n").encode()}
    fleet = SimpleNamespace(key_store=lambda: keys)
    cut = ["device.pub"]

    def put(data, path, mode=None):
        name = path.rsplit("/", 1)[1]
        if cut and name == cut[0]:
            cut.clear()
            raise DeployError(f"{path}: connection lost")
        device[name] = data

    for new_key in (True, False):  # the cut-off `deploy --new-key`, then a plain deploy
        info = {"device_pub": device.get("device.pub", b"").decode().strip() or None,
                "has_device_key": "device.key" in device, "operators_sha256": None}
        shell = SimpleNamespace(info=info, root="/r", dev=SimpleNamespace(name="d1"), put=put,
                                remove=lambda path: device.pop(path.rsplit("/", 1)[1], None))
        try:
            _ensure_identity(shell, fleet, lambda: None, new_key)
        except DeployError:
            assert new_key
    held = Signer.from_pem(device["device.key"], "device.key")
    assert device["device.pub"].decode().strip() == encode_key(held.public)
    assert keys.devices() == {"d1": held.public}  # what the agent signs with is what receivers trust


@pytest.mark.parametrize("holds", ["a key of its own making", "no key"])
def test_a_revoked_device_holding_another_key_or_none_is_not_let_back_in_by_a_deploy_without_new_key(tmp_path, holds):
    """A deploy refused only a device whose key was the revoked one: a stolen device that made itself a fresh pair (or
    removed its key) was given a key, or had its own registered, by the next routine `edgekit deploy` of the fleet,
    and every receiver trusted it again. Only --new-key gives a revoked device a key."""
    from types import SimpleNamespace

    from edge_kit.fleet.agent_install import ensure_agent

    keys = FleetKeys(tmp_path / "keys")
    keys.register_many({"d1": Signer.generate().public, "d2": Signer.generate().public})
    keys.revoke("d1", "stolen")
    made = Signer.generate()
    info = ({"device_pub": encode_key(made.public), "has_device_key": True} if holds != "no key"
            else {"device_pub": None, "has_device_key": False})
    fleet = SimpleNamespace(key_store=lambda: keys)

    def shell(name):
        return SimpleNamespace(dev=SimpleNamespace(name=name), info=info)

    with pytest.raises(KeyRevoked, match=r"^d1: revoked on \d{4}-\d\d-\d\d \d\d:\d\d UTC \(key [0-9a-f]{16}\) and it "
                                         rf"now holds {'another key' if info['device_pub'] else 'no key'}: .*--new-key"):
        ensure_agent(shell("d1"), fleet)
    assert set(keys.devices()) == {"d2"}
    with pytest.raises(AttributeError, match="root"):  # d2 is not revoked: past the check, into the deploy (which the fake lacks)
        ensure_agent(shell("d2"), fleet)


@pytest.mark.parametrize("at", [1e308, -1e308, "yesterday", None])
def test_a_revocation_time_no_calendar_shows_is_an_unknown_date_not_a_traceback(tmp_path, run_cli, at):
    """A revoked list edited by hand with a time of 1e308 (or NaN, which the strict reading now refuses as damage)
    made every command that names the revocation (fleet status, a deploy's refusal) end in a traceback: gmtime()
    raised OverflowError / ValueError. Now such a time reads as an unknown date."""
    import json

    from edge_kit.fleet.keys import revoked_on

    keys = FleetKeys(tmp_path / "keys")
    keys.register("d1", Signer.generate().public)
    entry, _ = keys.revoke("d1", "lost")
    entry["revoked"] = at
    keys.revoked_file.write_text(json.dumps([entry]))
    assert revoked_on(keys.revoked()[0]) == "an unknown date"
    (tmp_path / "fleet.yaml").write_text("fleet: f\nbroker: {host: 127.0.0.1, port: 1}\ndefaults: {user: u, "
                                         "profile: rpi4}\ndevices:\n  - {name: d1, host: h}\n")
    code, out, err = run_cli("fleet", "revoke", "d1", "--fleet", tmp_path / "fleet.yaml", "--json")
    assert json.loads(out)["newly_revoked"] is False and "Traceback" not in err, (code, err)


def test_a_batch_verified_against_the_registry_stats_its_files_once_and_a_revocation_counts_from_the_next(tmp_path,
                                                                                                            monkeypatch):
    """Every message verified stat'ed keys/devices.json and keys/revoked.json (the monitor's verifying process: two
    system calls a record, ~5 us of its ~130). A batch verified within ``checked_once`` looks at them once; a key
    revoked before a batch starts is refused in it, one revoked while a batch runs from the next batch on."""
    from pathlib import Path

    from edgekit_protocol.errors import MessageError

    keys = FleetKeys(tmp_path / "keys")
    d1, d2 = Signer.generate(), Signer.generate()
    keys.register_many({"d1": d1.public, "d2": d2.public})
    keyring = keys.keyring()
    signed = [_signed(d1, "d1") for _ in range(50)] + [_signed(d2, "d2") for _ in range(50)]
    stats = []
    real = Path.stat
    # this registry's files only: another test's client still closing (its keyring checks its own files) is not ours
    monkeypatch.setattr(Path, "stat", lambda self, **kw: (tmp_path in self.parents and stats.append(self.name))
                        or real(self, **kw))
    with keyring.checked_once():
        for msg in signed:
            keyring.verify(msg, msg["device"])
    assert sorted(stats) == ["devices.json", "revoked.json"]
    keys.revoke("d1", "stolen")  # between two batches: refused in the next
    with keyring.checked_once():
        with pytest.raises(MessageError, match="d1's key .* was revoked"):
            keyring.verify(signed[0], "d1")
        keyring.verify(signed[-1], "d2")
        keys.revoke("d2", "stolen too")  # while a batch runs: that batch verified against what it started with
        keyring.verify(signed[-1], "d2")
    with keyring.checked_once(), pytest.raises(MessageError, match="d2's key .* was revoked"):
        keyring.verify(signed[-1], "d2")
    with pytest.raises(MessageError, match="d2's key .* was revoked"):
        keyring.verify(signed[-1], "d2")  # outside a batch: checked at each message, as before


def test_a_batch_against_a_registry_never_readable_refuses_each_message_naming_the_file(tmp_path):
    """``checked_once`` never raises (the monitor's verifying process would end on it): a registry this receiver
    never could read is checked again at each message, each refused with the error naming the file."""
    keys = FleetKeys(tmp_path / "keys")
    keys.register("d1", Signer.generate().public)
    keys.registry.write_text("{damaged")
    keyring = keys.keyring()
    with keyring.checked_once():
        for _ in range(2):
            with pytest.raises(ConfigError, match="devices.json"):
                keyring.verify(_signed(Signer.generate(), "d1"), "d1")


def test_only_a_last_will_signed_before_the_revocation_is_a_revoked_device_s_leftover_when_live(tmp_path):
    """Receivers drop what a revoked device left at the broker (its retained copy, its last will) without refusing or
    alerting it, and took as left any live status or reported message whose ``ts`` was before the revocation. That
    ``ts`` is the device's clock: a thief holding the revoked key (and its broker password until the reload) set it
    back and every message it published was dropped unseen, though the docs say one signed after the revocation is
    refused and alerted. Live, only a will (an offline status) dated before the revocation is a leftover now."""
    import time

    from edgekit_protocol import messages

    keys = FleetKeys(tmp_path / "keys")
    thief = Signer.generate()
    keys.register("d1", thief.public)
    keys.revoke("d1", "stolen")
    ring = keys.keyring()
    before = time.time() - 3600

    def payload(kind, body, ts=before):
        return messages.encode(thief.sign({**messages.envelope(kind, "f", "d1", 5, body), "ts": ts}))

    will = payload("status", {"state": "offline"})
    online = payload("status", {"state": "online"})
    reported = payload("reported", {"current": None, "revision": 3})
    assert ring.left_by_revoked(messages.topic("f", "d1", "status"), will, retained=False)
    assert not ring.left_by_revoked(messages.topic("f", "d1", "status"), online, retained=False)
    assert not ring.left_by_revoked(messages.topic("f", "d1", "reported"), reported, retained=False)
    assert not ring.left_by_revoked(messages.topic("f", "d1", "status"), payload("status", {"state": "offline"}, time.time()), retained=False)
    assert ring.left_by_revoked(messages.topic("f", "d1", "status"), online, retained=True)  # the broker's retained copy: left there
    forged = messages.encode({**json.loads(will), "ts": before - 1})
    assert not ring.left_by_revoked(messages.topic("f", "d1", "status"), forged, retained=True)


def test_deploy_new_operator_key_makes_one_only_where_it_is_lost_and_before_it_touches_a_device(tmp_path, run_cli,
                                                                                                 monkeypatch):
    """The way back from a lost operator key: `deploy --new-operator-key` (a deploy pins the operator key on each
    device over SSH). Without it, the deploy stops in one line before touching a device; with it while the key is
    there, likewise (keys rotate replaces a key one holds)."""
    from types import SimpleNamespace

    import yaml

    from edge_kit.fleet import commands
    from edge_kit.fleet import deploy as dp
    from edge_kit.manifest import Artifact, Manifest

    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"fleet": "plant", "broker": {"host": "127.0.0.1", "port": 8883},
                                          "defaults": {"user": "pi"},
                                          "devices": [{"name": "cam-1", "host": "10.0.0.2", "profile": "rpi4"}]}))
    artifacts = tmp_path / "art"
    artifacts.mkdir()
    fp32 = Artifact(id="fp32", status="built", profiles=["rpi4"], summary="", precision="float32", runtime="litert",
                    file="fp32.tflite", sha256="0" * 64, bytes=1)
    (artifacts / "manifest.json").write_text(Manifest(created="2026-11-30T00:00:00+00:00", model={"name": "m"},
                                                      versions={}, profiles={"rpi4": {}}, artifacts=[fp32]).to_json())
    keys = FleetKeys(tmp_path / "keys")
    old = keys.operator
    keys.register("cam-1", _public(1))
    deployed: list[str] = []
    monkeypatch.setattr(dp._Deployer, "one", lambda self, dev: deployed.append(dev.name) or dp.DeviceResult(
        dev.name, "succeeded", variant="fp32", actions=["operator key pinned"]))
    monkeypatch.setattr(commands.FleetClient, "of", classmethod(
        lambda cls, fleet, **kw: SimpleNamespace(__enter__=lambda: None, close=lambda: None)))
    deploy = ("deploy", "--fleet", fleet_file, "--artifacts", artifacts)
    code, _, err = run_cli(*deploy, "--new-operator-key")
    assert code != 0 and "there already: --new-operator-key makes one only where it is lost" in err and not deployed
    (tmp_path / "keys" / "operator.key").unlink()
    code, _, err = run_cli(*deploy)
    assert code != 0 and "operator.key: missing" in err and len(err.strip().splitlines()) == 1 and not deployed
    code, out, err = run_cli(*deploy, "--new-operator-key")
    assert code == 0 and deployed == ["cam-1"], (out, err)
    new = FleetKeys(tmp_path / "keys").operator
    assert new.public != old.public and f"a new operator key {new.key_id} was made" in out
