"""Import TensorFlow with its C++ and Python logging turned down to errors.

Only the host compiler imports TensorFlow, and only through :func:`tensorflow`, so the CLI starts
fast for commands that do not convert anything and the terminal is not flooded by converter logs.
:func:`runtime_banner_dropped` does the same for the LiteRT interpreter's one INFO line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any


def tensorflow() -> Any:
    """Return the imported ``tensorflow`` module (with logs quietened).

    Raises:
        ImportError: TensorFlow is not installed; the message names the extra to install.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # bit-stable float results across runs
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError(f"the compiler needs TensorFlow: pip install 'edge-kit[host]' ({exc})") from None
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tf


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Capture stdout/stderr during a conversion, at the file-descriptor level.

    The converter's C++ code prints ("fully_quantize: 0, ...") straight to fd 1/2, below Python's
    ``sys.stdout``, so both the Python streams and the descriptors are redirected to a temp file.
    Yields a buffer holding what was captured once the block ends.
    """
    buf = io.StringIO()
    saved = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # no such descriptor (embedded interpreters); nothing to redirect
                continue
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, _ in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield buf
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            buf.write(sink.read().decode("utf-8", "replace"))


# LiteRT's C++ logger prints this on stderr the first time a process builds an interpreter with the
# XNNPACK delegate. TF_CPP_MIN_LOG_LEVEL does not reach that logger and its severity setting is not
# exposed to Python, so the line is taken out of fd 2 instead.
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
