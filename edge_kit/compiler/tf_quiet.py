"""Import TensorFlow with its C++ and Python logging turned down to errors.

Only the host compiler imports TensorFlow, and only through :func:`tensorflow`, so the CLI starts
fast for commands that do not convert anything and the terminal is not flooded by converter logs.
:func:`runtime_banner_dropped` (from :mod:`device_agents.runtimes.banner`) does the same for the
LiteRT interpreter's one INFO line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from device_agents.runtimes.banner import RUNTIME_BANNERS, runtime_banner_dropped

__all__ = ["RUNTIME_BANNERS", "runtime_banner_dropped", "tensorflow"]


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
