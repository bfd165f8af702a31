"""`edgekit fleet revoke`: take a compromised or lost device's key back, and its user at the broker.

The key moves from the fleet's registry to its revoked list (:meth:`edge_kit.fleet.keys.FleetKeys.revoke`), so
every receiver refuses the device's messages from then on ("revoked"), and no deploy registers that key again.
When the fleet's broker wall is known (``--broker-dir``, the folder ``edgekit fleet init --out`` wrote; or the
simulated fleet's own broker), the device's user is removed from its ``passwd`` too; the simulated broker is told
to reload it here, a real one by its operator. The way back is ``edgekit deploy --new-key``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_kit.errors import ConfigError, EdgeKitError, InputError
from edge_kit.fleet.broker_setup import (
    OPERATOR_USER,
    add_broker_user,
    broker_users,
    remove_broker_user,
    write_private,
)
from edge_kit.fleet.commands import clear_retained
from edge_kit.fleet.inventory import Device, Fleet
from edge_kit.sim.fleet import SimFleet

RELOAD_HINT = "tell Mosquitto to read it again: `systemctl reload mosquitto`, or send it SIGHUP"


@dataclass
class Revocation:
    """What :func:`revoke_device` did: the revoked-list ``entry``, whether this call revoked the key (``newly``;
    False: it was revoked already), and ``broker``, one line on the device's broker user (done, or what the
    operator must do)."""

    device: str
    entry: dict[str, Any]
    newly: bool
    broker: str
    broker_failed: bool = False  # the key is revoked, but its broker user could not be removed (``broker`` says why)
    retained: str = ""  # one line on what the broker kept retained for the device: cleared, or why not
    retained_failed: bool = False  # the key is revoked, but the broker could not be reached to clear them

    @property
    def partial(self) -> bool:
        """Return True when the key is revoked but a step at the broker failed (``broker`` or ``retained`` says
        which, and what to do): ``fleet revoke`` exits 4."""
        return self.broker_failed or self.retained_failed

    def as_dict(self) -> dict[str, Any]:
        """Return it as plain data (for ``--json``)."""
        return {"device": self.device, "newly_revoked": self.newly, "broker": self.broker,
                "broker_failed": self.broker_failed, "retained": self.retained, "retained_failed": self.retained_failed,
                **{k: self.entry.get(k) for k in ("key_id", "key", "registered", "revoked", "reason")}}


def _wall(fleet: Fleet, broker_dir: Path | None) -> tuple[Path | None, SimFleet | None]:
    """Return the broker wall's password file (``broker_dir/passwd``; else the simulated broker's when ``fleet`` is
    the fleet ``edgekit sim up`` runs, with that fleet; else None).

    Raises:
        InputError: ``broker_dir`` holds no ``passwd`` file.
    """
    if broker_dir is not None:
        passwd = Path(broker_dir) / "passwd"
        if not passwd.is_file():
            raise InputError(f"--broker-dir {broker_dir}: no passwd file there; give the folder `edgekit fleet init "
                             "--out` wrote (nothing was changed)")
        return passwd, None
    sim = SimFleet(fleet.source.resolve().parent)
    if sim.fleet_file != fleet.source.resolve():
        return None, None
    passwd = sim.broker_passwd()
    return passwd, sim if passwd is not None else None


def _users_of(fleet: Fleet, user: str) -> list[str]:
    """Return the devices of ``fleet`` whose agent connects as the broker user ``user`` (their ``agent_broker``
    username), in the fleet file's order."""
    return [d.name for d in fleet.devices if d.agent_broker and d.agent_broker.username == user]


def _broker_user(fleet: Fleet, device: str) -> str | None:
    """Return the broker user ``device``'s agent connects as: its ``agent_broker`` username (the device's name when
    it is not in the fleet file, as the wall names users); None when it shares the fleet's broker user (or would
    connect as the operator), or another device of the fleet connects as that user too: not the device's alone to
    lose."""
    dev = next((d for d in fleet.devices if d.name == device), None)
    if dev is None:
        return device if not _users_of(fleet, device) else None
    user = dev.agent_broker.username if dev.agent_broker else None
    if not user or user == OPERATOR_USER or user == fleet.broker.username or _users_of(fleet, user) != [device]:
        return None
    return user


def _reloaded(said: str, sim: SimFleet | None) -> str:
    """Return ``said`` with how the broker learns of the change: the simulated one is sent SIGHUP here."""
    if sim is None:
        return f"{said}; {RELOAD_HINT}"
    return said + ("; the simulated broker read it again (SIGHUP)" if sim.reload_broker()
                   else "; the simulated broker is not running")


def revoke_device(fleet: Fleet, device: str, reason: str = "", broker_dir: Path | None = None) -> Revocation:
    """Revoke ``device``'s key and, where the broker wall is known, remove its broker user.

    The broker's password file is ``broker_dir/passwd`` when given, else the simulated broker's when ``fleet``
    is a fleet ``edgekit sim up`` runs (that broker is reloaded here); without either the user is left and
    the result says what to do at the broker. A device already revoked is revoked again without change (its
    broker user is still removed if it is there). Then what the broker keeps retained for the device (its status and
    reported state, the operator's desired state for it) is cleared (:func:`~edge_kit.fleet.commands.clear_retained`),
    every time. A broker restarted after this publishes the device's last will (retained) as it goes down; receivers
    drop it as what a revoked device left (:meth:`~edge_kit.fleet.keys._RegistryKeyring.left_by_revoked`), so no
    second run is needed (one clears it from the broker).

    Returns:
        What was done.

    Raises:
        InputError: ``broker_dir`` holds no readable ``passwd`` (checked before anything changes), or no key is
            registered for ``device`` and none was revoked.
        ConfigError: the registry or the revoked list is damaged (left as they are).
        OSError: the registry or the revoked list cannot be written (each stays whole; a ``passwd`` that cannot be
            rewritten is ``broker_failed`` in the result instead, a broker that cannot be reached ``retained_failed``:
            the key is revoked by then).
    """
    passwd, sim = _wall(fleet, broker_dir)
    user = _broker_user(fleet, device)
    entry, newly = fleet.key_store().revoke(device, reason)
    if user is None:
        dev = next((d for d in fleet.devices if d.name == device), None)
        named = (dev.agent_broker.username if dev is not None and dev.agent_broker else None) or device
        others = [d for d in _users_of(fleet, named) if d != device]
        broker = ((f"it connects as broker user '{named}', which other devices use too ({', '.join(others[:5])}"
                   f"{f' and {len(others) - 5} more' if len(others) > 5 else ''}): left in place"
                   if others else "it connects with the fleet's shared broker user, which was left in place (the "
                   "others use it)") + "; give each device agent_broker credentials of its own (edgekit fleet init)")
    elif passwd is None:
        broker = (f"its broker user '{user}' is untouched: remove it at your broker (mosquitto_passwd -D passwd "
                  f"{user}) and {RELOAD_HINT}; or give --broker-dir, the folder `edgekit fleet init` wrote")
    else:
        try:
            removed = remove_broker_user(passwd, user)
        except OSError as exc:  # the key is revoked by now: say so, and what is left to do at the broker
            done = Revocation(device, entry, newly, f"its broker user '{user}' could not be removed from {passwd} "
                              f"({exc.strerror or exc}): remove it there (mosquitto_passwd -D passwd {user}) and "
                              f"{RELOAD_HINT}; or run this command again", broker_failed=True)
            return _cleared(fleet, done)
        broker = (_reloaded(f"removed its broker user '{user}' from {passwd}", sim) if removed
                  else f"no broker user '{user}' in {passwd} (removed already)")
    return _cleared(fleet, Revocation(device, entry, newly, broker))


def _cleared(fleet: Fleet, done: Revocation) -> Revocation:
    """Return ``done`` once what the broker keeps retained for its device is cleared, with a line saying so, or why
    not (``retained_failed``: the broker could not be reached; the revocation stands). Raises nothing more."""
    try:
        done.retained = clear_retained(fleet, done.device)
    except EdgeKitError as exc:
        done.retained = (f"its retained status, reported and desired messages are left on the broker ({exc}); "
                         "receivers refuse them: run this command again once the broker is up to clear them")
        done.retained_failed = True
    return done


def readmit_broker_users(fleet: Fleet, devices: list[Device], broker_dir: Path | None = None) -> list[str]:
    """Give each of ``devices`` whose own broker user is missing from the known broker wall (removed by
    :func:`revoke_device`) a fresh password: written to its ``agent_broker.password_file`` (mode 600, which the
    deploy then ships) and added to the wall's ``passwd``; the simulated broker is told to reload. For
    ``deploy --new-key``: the device's old password went with the old key.

    Returns:
        One line per device readmitted, and one on how the broker learns of it (empty when none was missing, or
        the wall is not known).

    Raises:
        InputError: ``broker_dir`` holds no ``passwd`` file, or it cannot be read or is not UTF-8 text (names it).
        ConfigError: a device to readmit has no ``agent_broker.password_file`` to write its password to.
        OSError: a file cannot be written.
    """
    import secrets

    passwd, sim = _wall(fleet, broker_dir)
    if passwd is None:
        return []
    present = broker_users(passwd)
    lines = []
    for dev in devices:
        user = _broker_user(fleet, dev.name)
        if user is None or user in present:
            continue
        where = dev.agent_broker.password_file if dev.agent_broker else None
        if where is None:
            raise ConfigError(f"fleet file, device {dev.name}: agent_broker has no password_file to write its new "
                              "broker password to; add one (edgekit fleet init writes them)")
        password = secrets.token_urlsafe(24)
        write_private(Path(where).expanduser(), (password + "\n").encode())
        add_broker_user(passwd, user, password)
        lines.append(f"{dev.name}: broker user '{user}' added back to {passwd} with a fresh password ({where})")
    if lines:
        lines.append(_reloaded(f"broker: {passwd} changed", sim))
    return lines
