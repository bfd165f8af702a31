"""Keep the LiteRT runtime's one INFO line off stderr, and nothing else.

LiteRT's C++ logger prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on fd 2 the
first time a process builds an interpreter with the XNNPACK delegate, in the middle of whatever the
CLI or the agent is printing. ``TF_CPP_MIN_LOG_LEVEL`` does not reach that logger and its severity
setting is not exposed to Python, so the line is taken out of fd 2 instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

RUNTIME_BANNERS = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)
_banner_lock = threading.Lock()
_banner_dropped = False


@contextlib.contextmanager
def runtime_banner_dropped() -> Iterator[None]:
    """Drop the LiteRT runtime's INFO banner (:data:`RUNTIME_BANNERS`) from fd 2 during the block.

    Wrap interpreter creation in it. fd 2 goes to a temporary file for the block; when the block ends
    (normally or by an exception) every other line written to fd 2 meanwhile is passed on, in order:
    the runtime's warnings and errors are delayed to the end of the block, never hidden. The runtime
    prints the banner once per process, so once it has been dropped the block redirects nothing.
    """
    global _banner_dropped
    if _banner_dropped:
        yield
        return
    with _banner_lock:  # one redirect of fd 2 at a time; the saved fd is taken inside, never another's sink
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 (embedded interpreters): nothing to redirect
            saved = None
        if saved is None:
            yield
            return
        with tempfile.TemporaryFile(mode="w+b") as sink:
            sys.stderr.flush()
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
                sink.seek(0)
                kept = []
                for line in sink.read().splitlines(keepends=True):
                    if line.rstrip(b"\r\n") in RUNTIME_BANNERS:
                        _banner_dropped = True
                    else:
                        kept.append(line)
                rest = b"".join(kept)
                while rest:
                    rest = rest[os.write(2, rest):]
