"""What applications on the device use: the agent's serving API, or the active model in-process.

``Client(root).predict({"image": x})`` sends one sample (float arrays by input name; a bare array
for a single-input model) and returns ``{output name: float32 array}``, the same whichever variant
is active. ``open_current(root)`` runs the active model in the application's own process instead
(no IPC) and reloads it when ``<root>/current`` moves.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agents.errors import (
    NO_ACTIVE_MODEL,
    DeviceError,
    RuntimeUnavailable,
    StoreError,
)
from device_agents.lazy import LazyModule
from device_agents.serving.frames import (
    DTYPES,
    HANGS_UP_AFTER,
    FrameError,
    Receiver,
    busy_poll,
    describe,
    encode_head,
    set_timeout,
    shared_memory_available,
    socket_address,
    socket_buffers,
    write_frame,
)
from device_agents.store import default_root
from edgekit_protocol.errors import EdgeKitError

if TYPE_CHECKING:
    import numpy as np
else:  # imported at the first tensor (info, live and pause: edgekit-agent state, activate go without it), then
    np = LazyModule("numpy", globals(), "np")  # a plain global: a request runs no import statement

SOCKET = "serve.sock"
SHM_MIN = 64 * 1024  # inputs at least this large go through shared memory


class ServingError(DeviceError):
    """Every failure an application meets through :meth:`Client.predict`, :meth:`Client.info` and
    :meth:`CurrentModel.predict`: the serving API answered with an error (the text is its reason) or
    cannot be reached, the inputs do not fit the model, or (in-process) the active model cannot be read,
    loaded or run. The text names what failed and what to do; a cause that is another error is chained
    (``__cause__``)."""


class ServingStoreError(ServingError, StoreError):
    """In-process (:func:`open_current`): the active model's files are missing or no longer hash as
    installed. A :class:`~device_agents.errors.StoreError` too, for code that catches that."""


class ServingRuntimeUnavailable(ServingError, RuntimeUnavailable):
    """In-process (:func:`open_current`): no runtime installed in the application's environment runs the
    active model's format (the text says what to install). A
    :class:`~device_agents.errors.RuntimeUnavailable` too, for code that catches that."""


def _first_line(exc: BaseException) -> str:
    """Return the first line of ``exc``'s text, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _carried(arrays: dict[str, np.ndarray]) -> None:
    """Check that the API's frames carry every array's dtype (:data:`~device_agents.serving.frames.DTYPES`);
    called when a request's header is first built for these inputs' names, dtypes and shapes, not per request.

    Raises:
        ServingError: an input's dtype is not one of them (named, with what to do).
    """
    for name, a in arrays.items():
        if a.dtype.name not in DTYPES:
            raise ServingError(f"input {name!r}: dtype {a.dtype} is not one the serving API carries "
                               f"({', '.join(DTYPES)}); convert it first, e.g. np.asarray(x, np.float32)")


def _named(inputs: dict[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
    """Return ``inputs`` as arrays by name (a bare array is named ``x``)."""
    return {k: np.asarray(v) for k, v in inputs.items()} if isinstance(inputs, dict) else {"x": np.asarray(inputs)}


def _address(a: np.ndarray) -> int:
    """Return the address of ``a``'s first byte (``ndarray.ctypes`` builds an object: microseconds, so
    the request path asks only for an array that lies in the client's memory file)."""
    return a.ctypes.data


def _told(receiver: Any, max_payload: int) -> dict[str, Any] | None:
    """Return the error answer a server sent before it closed the connection, or None (never raises)."""
    try:
        frame = receiver.read(max_payload)
    except (OSError, FrameError):
        return None
    return frame[0] if frame is not None and frame[0].get("ok") is False else None


class Client:
    """A connection to the agent's serving API (one request at a time; use one client per thread).

    ``root`` is the agent's root folder (default: the agent's own default, ``/opt/edgekit`` as root, else
    ``~/.edgekit``, where a deploy puts it); the socket is ``<root>/serve.sock`` unless ``path`` names it.
    It connects on the first request (and again after the agent closed the connection). ``timeout``
    (seconds) bounds the connect, each request's send and the wait for its answer: a request not
    answered within it raises :class:`ServingError` and is not sent again.

    Raises:
        ValueError: ``busy_poll_us`` is not an integer from 0 to 1,000,000.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None,
                 timeout: float = 30.0, max_payload: int = 1 << 30, shared_memory: bool | None = None,
                 busy_poll_us: int = 0):
        self.path = Path(path) if path else (Path(root).expanduser() if root else default_root()) / SOCKET
        self.timeout = timeout
        self.max_payload = max_payload
        # inputs of 64 kB or more go through a sealed memory file (None: where the system has them, Linux)
        self.shared_memory = shared_memory_available() if shared_memory is None else shared_memory
        # wait for an answer on the CPU for up to this long, centred on when it is expected (the quickest
        # of the last round trips), sleeping in the kernel before: no wake-up to pay when it comes within
        # that window, one core kept busy only meanwhile (0: sleep until it comes, the default)
        if not isinstance(busy_poll_us, int) or isinstance(busy_poll_us, bool) or not 0 <= busy_poll_us <= 1_000_000:
            raise ValueError(f"busy_poll_us: {busy_poll_us!r} is not 0 to 1000000 microseconds")
        self.busy_poll_ns = busy_poll_us * 1000
        self._round_trips: deque[int] = deque(maxlen=8)  # ns from a request sent to its answer in
        self._shm: Any = None  # (descriptor, mmap, its bytes as a uint8 array) of this client's memory file
        self._shm_start = 0  # the address of its first byte
        self._shm_on: socket.socket | None = None  # the connection its descriptor was passed on
        self._sock: socket.socket | None = None
        self._receiver: Receiver | None = None
        self._heads: dict[Any, Any] = {}  # encoded predict headers by inputs' names, dtypes and shapes
        self._shm_head = b""  # the encoded header of the last _share()
        self.model: dict[str, Any] | None = None  # the model that answered the last request

    def _connect(self) -> None:
        """Connect to the API (the kernel's send and receive timeouts set: no poll() before every call).

        Raises:
            ServingError: nothing listens at the socket (the agent is not running), or no permission
                (the application's user is neither the agent's nor in its group: said so); the connect's
                :class:`OSError` chained (``__cause__``), so a caller tells no agent
                (:class:`FileNotFoundError`, :class:`ConnectionRefusedError`) from one that turned it away later.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socket_buffers(sock)
        sock.settimeout(self.timeout)  # the connect; then the kernel's timeouts: no poll() before every call
        try:
            with socket_address(self.path) as address:  # a deep root's path is longer than a socket's
                sock.connect(address)
        except PermissionError as exc:
            sock.close()
            raise ServingError(f"serving API at {self.path}: permission denied; the socket is for the agent's user and "
                               "group (mode 660): run the application as one of them (or add its user to the group)") from exc
        except OSError as exc:
            sock.close()
            raise ServingError(f"serving API at {self.path}: {exc.strerror or exc}; is the agent running?") from exc
        sock.settimeout(None)
        if not all([set_timeout(sock, opt, self.timeout) for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)]):
            sock.settimeout(self.timeout)  # a platform without them: Python's own timeout
        self._sock, self._receiver = sock, Receiver(sock)

    def _call(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
              head: bytes | None = None) -> tuple[dict, dict]:
        """Send one request (``head``: its encoded start, when the caller has it) and return the answer's
        header and arrays. A ``shm`` request passes the memory file's descriptor along when this
        connection has not had it yet.

        Raises:
            ServingError: the answer is an error (its text), the API cannot be reached twice (a connection it closed
                before taking the request, EPIPE on the send or ECONNRESET on the receive, is opened again once), the
                connection is closed once the request was sent with no answer, the answer is malformed or cut short,
                or no answer came within ``timeout`` (none of these three sent again: the agent took it and would run
                it twice, and the caller wait twice its timeout). After an error answer the server hangs up after
                (:data:`~device_agents.serving.frames.HANGS_UP_AFTER`) the connection is closed: the next request
                opens a new one.
        """
        for attempt in (1, 2):  # a connection the server closed before taking the request is opened again once
            if self._sock is None:
                self._connect()
            fds = [self._shm[0]] if "shm" in header and self._shm is not None and self._shm_on is not self._sock else None
            sent = time.perf_counter_ns()
            try:
                try:
                    write_frame(self._sock, header, arrays, head=head, fds=fds)
                    if fds:
                        self._shm_on = self._sock
                except (BrokenPipeError, ConnectionResetError):
                    told = _told(self._receiver, self.max_payload)  # the server may have said why before it closed (busy)
                    if told is None:
                        raise
                    self._drop()
                    raise ServingError(str(told.get("error"))) from None
                if self.busy_poll_ns:
                    self._await_answer(sent)
                frame = self._receiver.read(self.max_payload)
            except (TimeoutError, BlockingIOError):  # the kernel's timeout (EAGAIN): the request was sent, never again
                self._drop()
                raise ServingError(f"serving API at {self.path}: no answer within {self.timeout:g} s (Client's timeout); "
                                   "the agent is busy or stuck: retry, or give a longer timeout") from None
            except FrameError as exc:  # a malformed or truncated answer: the request was taken, never sent again
                self._drop()
                raise ServingError(f"serving API at {self.path}: its answer: {exc}") from None
            except OSError as exc:
                self._drop()
                if attempt == 2:
                    raise ServingError(f"serving API at {self.path}: {exc}") from None
                continue
            if frame is None:  # the whole request was read (Linux: one left unread is ECONNRESET): taken, never again
                self._drop()
                raise ServingError(f"serving API at {self.path}: it closed the connection without answering (the "
                                   "agent stopped, or failed on this request: see its log); not sent again")
            answer, tensors = frame
            if self.busy_poll_ns and header.get("op") == "predict":  # an info call's quick answer says nothing
                self._round_trips.append(time.perf_counter_ns() - sent)
            if not answer.get("ok"):
                error = str(answer.get("error"))
                if error.startswith(HANGS_UP_AFTER):  # the server hangs up after it: a new connection next (a request
                    self._drop()  # sent before its close would meet the end of the stream, taken as read)
                raise ServingError(error)
            self.model = answer.get("model")
            return answer, tensors
        raise AssertionError("unreachable")

    def _await_answer(self, sent_ns: int) -> None:
        """Return once the answer to a request sent at ``sent_ns`` is readable, or once ``busy_poll_us``
        of polling for it have passed: asleep in the kernel (woken by an early answer) until half that
        window before the answer is expected, then on the CPU. Never raises (the receive reports a
        failed socket)."""
        if self._round_trips:
            sleep_ns = sent_ns + min(self._round_trips) - self.busy_poll_ns // 2 - time.perf_counter_ns()
            if sleep_ns > 0:
                try:
                    select.select([self._sock], [], [], sleep_ns / 1e9)
                except (OSError, ValueError):
                    return
        busy_poll(self._sock, self.busy_poll_ns)

    def predict(self, inputs: dict[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Return the active model's outputs for one sample (inputs of 64 kB or more, and arrays from
        :meth:`shared`, through shared memory).

        Raises:
            ServingError: the inputs do not fit the model (a dtype the API does not carry included), no
                model is active, the API is unreachable, or the memory file for a large input cannot be made.
        """
        arrays = _named(inputs)
        size = sum(a.nbytes for a in arrays.values())
        if self.shared_memory and (size >= SHM_MIN or self._in_file(arrays)):
            header = self._share(arrays, size)
            return dict(self._call(header, head=self._shm_head)[1])
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        key = tuple((k, v.dtype.str, v.shape) for k, v in arrays.items())
        head = self._heads.get(key)
        if head is None:
            _carried(arrays)
            if len(self._heads) > 64:
                self._heads.clear()
            head = self._heads[key] = encode_head({"op": "predict", "tensors": describe(arrays)})
        return dict(self._call({"op": "predict"}, arrays, head=head)[1])

    def shared(self, inputs: dict[str, Any] | np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
        """Return ``inputs`` copied into this client's memory file, as writable arrays there (by name,
        or one array for a bare array): write the next sample into them in place (``out=`` of numpy
        or OpenCV) and pass them to :meth:`predict`, which then copies nothing. The file holds one
        request's inputs: a :meth:`predict` of other arrays writes them over these. They stay valid
        memory when a larger input needs a new file, but are then sent like any array.

        Raises:
            ServingError: this client does not use shared memory (``shared_memory=False``, or not Linux), or
                the memory file cannot be made (out of memory or descriptors).
        """
        if not self.shared_memory:
            raise ServingError("this client does not use shared memory (shared_memory=False, or no memfd_create here)")
        arrays = _named(inputs)
        self._share(arrays, sum(a.nbytes for a in arrays.values()))
        base, at, views = self._shm[2], 0, {}
        for key, a in arrays.items():
            views[key] = base[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
            at += a.nbytes
        return views if isinstance(inputs, dict) else views["x"]

    def _in_file(self, arrays: dict[str, np.ndarray]) -> bool:
        """Return whether any of ``arrays`` lies in this client's current memory file (from :meth:`shared`)."""
        return self._shm is not None and any(np.may_share_memory(a, self._shm[2]) for a in arrays.values())

    def _share(self, arrays: dict[str, np.ndarray], size: int) -> dict[str, Any]:
        """Copy ``arrays`` into this client's memory file (each that is not already in place there, see
        :meth:`shared`); return the request header naming them (its encoded form in ``_shm_head``; the
        same header object for the same inputs: not to be changed).

        The file is made with ``memfd_create`` and sealed against shrinking before the server sees it
        (the server refuses it otherwise); a larger input gets a new file, passed again.

        Raises:
            ServingError: an input's dtype is not one the API carries (:func:`_carried`), or the memory file
                cannot be made (out of memory or descriptors; the cause chained).
        """
        import fcntl
        import mmap

        if any(a.dtype.hasobject for a in arrays.values()):  # Python objects: no bytes to copy
            _carried(arrays)

        if self._shm is None or len(self._shm[1]) < size:
            self._close_shm()
            try:
                fd = os.memfd_create("edgekit-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            except OSError as exc:
                raise ServingError(f"serving API at {self.path}: cannot make the memory file for {size} bytes of "
                                   f"inputs ({exc.strerror or exc}); free memory or descriptors, or use "
                                   "Client(shared_memory=False)") from exc
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
                buf = mmap.mmap(fd, size)
                self._shm = (fd, buf, np.frombuffer(buf, np.uint8))
                self._shm_start = _address(self._shm[2])
            except OSError as exc:
                os.close(fd)
                raise ServingError(f"serving API at {self.path}: cannot make the memory file for {size} bytes of "
                                   f"inputs ({exc.strerror or exc}); free memory, or use Client(shared_memory=False)") from exc
            except BaseException:
                os.close(fd)
                raise
        _, _, base = self._shm
        spec, at = [], 0
        for key, a in arrays.items():
            a = np.ascontiguousarray(a)
            # an array outside the file (the usual case) is told apart without its address (ctypes: microseconds)
            inside = a.nbytes and np.may_share_memory(a, base)
            if a.nbytes and not (inside and _address(a) == self._shm_start + at):  # not in place (shared())
                if inside:
                    a = a.copy()  # elsewhere in the file: never copied onto itself
                base[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
            spec.append((key, a.dtype, a.shape, at))  # the dtype itself: its .name costs microseconds
            at += a.nbytes
        cached = self._heads.get(("shm", *spec))
        if cached is None:  # the same inputs: the same header, encoded once
            _carried(arrays)
            if len(self._heads) > 64:
                self._heads.clear()
            header = {"op": "predict", "shm": True,
                      "tensors": [{"name": k, "dtype": d.name, "shape": list(s), "offset": o} for k, d, s, o in spec]}
            cached = self._heads[("shm", *spec)] = (header, encode_head(header))
        header, self._shm_head = cached
        return header

    def _close_shm(self) -> None:
        """Unmap and close this client's memory file (the server lets go of its mapping with the
        connection or the next file; never raises)."""
        if self._shm is not None:
            fd, buf, base = self._shm
            self._shm = self._shm_on = None
            del base  # its export of the mapping
            try:
                buf.close()
            except BufferError:  # arrays from shared() still view it: unmapped when the last is gone
                pass
            os.close(fd)

    def info(self) -> dict[str, Any]:
        """Return the served model (``model``: sha256, variant) and its ``inputs`` and ``outputs``.

        Raises:
            ServingError: no model is active, or the API cannot be reached or answers malformed frames.
        """
        return self._call({"op": "info"})[0]

    def live(self) -> dict[str, Any]:
        """Return the agent's live figures of the model it serves (:meth:`device_agents.serving.server.Server.figures`:
        requests, errors, service time percentiles, queue depth, clients, what was turned away, and what they
        cover), read from the running agent itself: no broker needed. ``model`` is None while nothing is served.

        Raises:
            ServingError: the API cannot be reached (the agent is not running), or is an agent too old to answer it
                (``unknown op 'live'``; :attr:`connected` tells an answer from no agent).
        """
        answer = self._call({"op": "live"})[0]
        return {k: v for k, v in answer.items() if k not in ("ok", "tensors")}

    def pause(self, delegate: str, options: dict[str, Any] | None, why: str) -> dict[str, Any] | None:
        """Ask the agent to close its serving interpreters that hold the accelerator a child of this process is about
        to open with ``delegate`` and ``options`` (an Edge TPU, which one process at a time opens), for as long as this
        client stays connected: :meth:`close`, or this process's end (killed included), resumes serving. ``why`` is
        what its requests are told meanwhile. Only the agent's user or root may. Returns the paused model
        (``{"sha256", "variant"}``), or None when its serving holds no such accelerator.

        Raises:
            ServingError: as :meth:`info` (an agent older than pausing: ``unknown op 'pause'``), or another user's.
        """
        return self._call({"op": "pause", "delegate": delegate, "options": options, "why": why})[0].get("paused")

    @property
    def connected(self) -> bool:
        """Return True while this client holds a connection to the API: after a request the agent answered (an error
        it answered included), not after one it could not be reached for or did not answer in time."""
        return self._sock is not None

    def _drop(self) -> None:
        """Close the connection (the next call opens a new one, and passes the memory file again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = self._receiver = self._shm_on = None

    def close(self) -> None:
        """Close the connection and this client's memory file."""
        self._drop()
        self._close_shm()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class CurrentModel:
    """The active model in this process: ``predict`` reloads it when ``<root>/current`` has moved."""

    def __init__(self, root: str | os.PathLike | None = None, *, runtime: str | None = None, threads: int = 1,
                 delegate: str = "xnnpack"):
        self.root = Path(root).expanduser() if root else default_root()  # as Client: the agent's own default
        self.runtime, self.threads, self.delegate = runtime, threads, delegate
        self._lock = threading.Lock()
        self._store: Any = None  # the agent's store, read only (made at the first predict: no import before)
        self._sha: str | None = None
        self._runner: Any = None
        # the last load that failed: (its model's files as they were, monotonic time, the error), so a broken model
        # is not hashed and loaded again at every call, only once its files change or RETRY_S have passed
        self._failed: tuple[tuple, float, ServingError] | None = None

    RETRY_S = 30.0

    @staticmethod
    def _files(store: Any, sha: str) -> tuple:
        """Return what tells the stored model ``sha``'s files from a repaired or re-permitted copy: inode, size,
        modification and change time of its folder, artifact and ``meta.json`` (the error number of each that cannot
        be looked at). A few ``stat`` calls, no read."""
        from device_agents.formats import SUFFIX
        from device_agents.store import META

        folder = store.models / sha
        out: list[Any] = [sha]
        for path in (folder, *(folder / ("model" + suffix) for suffix in SUFFIX.values()), folder / META):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            except OSError as exc:
                out.append(exc.errno)
        return tuple(out)

    def _follow(self) -> Any:
        """Return the runner of the active model, loaded anew when ``<root>/current`` has moved.

        Raises:
            ServingError: no model store at ``root`` (a mistyped root), no active model, the root cannot be
                read, or the active model cannot be loaded (see :meth:`_load`).
        """
        from device_agents.store import ModelStore

        if self._store is None:  # one for the model's life: a switch.json it cannot read is logged once
            self._store = ModelStore(self.root)
        store = self._store
        try:
            sha = store.current()
            if sha is None and not store.models.is_dir():  # a mistyped root: not "no model is active"
                raise ServingError(f"no model store at {self.root} (no models/ folder): pass open_current() the agent's "
                                   f"root (agent.yaml's root; default {default_root()})")
        except OSError as exc:  # no permission on the root (is_dir() raises for it)
            raise ServingError(f"open_current({self.root}): cannot read the agent's root ({exc.strerror or exc}); run "
                               "the application as the agent's user or group (or give it read access)") from exc
        if sha is None:
            raise ServingError(f"{NO_ACTIVE_MODEL} (root {self.root})")
        if sha != self._sha:
            files = self._files(store, sha)
            if self._failed is not None and self._failed[0] == files and time.monotonic() - self._failed[1] < self.RETRY_S:
                why = self._failed[2]  # nothing changed: the same answer, without hashing and loading it again
                raise type(why)(str(why)) from why.__cause__
            try:
                self._runner = self._load(store, sha)
            except ServingError as exc:
                self._failed = (files, time.monotonic(), exc)
                raise
            self._sha, self._failed = sha, None
        return self._runner

    def _load(self, store: Any, sha: str) -> Any:
        """Return a runner of the stored model ``sha`` (its sha256 checked first), on the runtime its format needs.

        Raises:
            ServingStoreError: its file or ``meta.json`` is missing, or the file no longer hashes to its sha256.
            ServingRuntimeUnavailable: no runtime installed here runs its format (the text says what to install).
            ServingError: it cannot be read (no permission) or loaded (not a model the runtime takes, a
                delegate option it refuses); each names the root, the variant and the file, and what to do.
        """
        from device_agents.inference import ModelRunner
        from device_agents.runtimes import get_runtime

        try:
            variant = (store.describe(sha) or {}).get("variant") or "variant unknown"
        except OSError:  # its folder cannot be read: verify() below says so
            variant = "variant unknown"
        path = store.model_path(sha)
        where = f"open_current({self.root}): the active model {sha[:12]} ({variant}, {path})"
        other = "or activate another (edgekit-agent rollback, or edgekit-agent activate --variant ...)"
        try:
            path = store.verify(sha)  # never a model whose bytes changed
            runtime = get_runtime(self.runtime, model=path)  # by the model's format: LiteRT or ONNX Runtime
            return ModelRunner(runtime.interpreter(path, threads=self.threads, delegate=self.delegate,
                                                   options=runtime.reader_options))  # nothing written in the store
        except StoreError as exc:
            raise ServingStoreError(f"{where}: {exc}; {other}") from exc
        except RuntimeUnavailable as exc:
            raise ServingRuntimeUnavailable(f"{where} cannot run in this process: {exc}") from exc
        except PermissionError as exc:
            raise ServingError(f"{where} cannot be read ({exc.strerror or exc}): run the application as the agent's "
                               "user or group") from exc
        except (OSError, ValueError, RuntimeError, EdgeKitError) as exc:  # EdgeKitError: a delegate's options
            raise ServingError(f"{where} cannot be loaded: {_first_line(exc)}; deploy it again, {other}") from exc

    @property
    def sha256(self) -> str | None:
        """Return the sha256 of the model the last ``predict`` used."""
        return self._sha

    def predict(self, inputs: dict[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Return the active model's outputs for one sample (float32 by output name), loading it anew when
        ``<root>/current`` has moved. A model that failed to load is tried again once its files change (repaired,
        reinstalled, made readable) or ``RETRY_S`` (30 s) after; meanwhile each call raises the same error at the cost
        of a few ``stat`` calls.

        Raises:
            ServingError: every failure, as :class:`Client` raises it: no model store at ``root`` (a mistyped
                root), no active model, inputs that do not fit it, the interpreter failing on them, or the
                active model not loadable here: :class:`ServingStoreError` (also a ``StoreError``) for a file
                missing or damaged, :class:`ServingRuntimeUnavailable` (also a ``RuntimeUnavailable``) for a
                runtime missing for its format, a plain :class:`ServingError` (the cause chained) for a file it
                cannot read or load.
        """
        with self._lock:
            runner = self._follow()
            try:
                tensors = runner.sample_tensors(_named(inputs))
            except (ValueError, TypeError) as exc:
                raise ServingError(str(exc)) from None
            try:
                runner.invoke_raw(tensors)
                return runner.results()
            except (ValueError, RuntimeError) as exc:
                raise ServingError(f"open_current({self.root}): inference failed on the active model {self._sha[:12]}: "
                                   f"{_first_line(exc)}") from exc


def open_current(root: str | os.PathLike | None = None, **kwargs: Any) -> CurrentModel:
    """Return the active model of the agent store at ``root``, run in this process (see :class:`CurrentModel`).

    ``root`` left out is the agent's own default, as for :class:`Client` (``/opt/edgekit`` as root, else
    ``~/.edgekit``). Nothing is loaded until the first ``predict``, which raises only :class:`ServingError`
    (:meth:`CurrentModel.predict` says which subclasses).
    """
    return CurrentModel(root, **kwargs)
