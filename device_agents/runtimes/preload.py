"""Imported by :class:`device_agents.smoke.SmokePool`'s forkserver before it forks a child (its preload, and nothing
else imports it): the first installed interpreter runtime's module, so a child costs a model load, not that import.

Here, not at the import of :mod:`device_agents.smoke`: ``edgekit-agent activate``'s parent imports that too, and one
that changes nothing (the model is current already) then starts without the interpreter and numpy.
"""

from __future__ import annotations

from device_agents.runtimes import RUNTIMES

for _cls in RUNTIMES.values():
    if _cls.unavailable_reason() is None:
        break
