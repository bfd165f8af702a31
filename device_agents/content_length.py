"""Byte counts in HTTP headers (``Content-Length``, ``Content-Range``), read one way by the agent's HTTP code:
the artifact download (:mod:`device_agents.fetch`), the serving API's loopback endpoint
(:mod:`device_agents.serving.http`) and the host's store check. Standard library only.

``int()`` is no parser for them: it takes ``"²"`` for no number (``str.isdigit`` says it is one) and refuses
more than 4300 digits, each with a bare ValueError that names no header, no URL and no client.
"""

from __future__ import annotations

import re

DIGITS = "[0-9]{1,19}"  # a byte count: ASCII digits, below 10**19 (more than any file or body)
_COUNT = re.compile(rf"^({DIGITS})$")


def byte_count(value: str | None) -> int | None:
    """Return the byte count a header value states, or None when it states none: absent, not ASCII digits
    (surrounding blanks aside), or 20 digits and more."""
    m = _COUNT.match((value or "").strip())
    return int(m.group(1)) if m else None
