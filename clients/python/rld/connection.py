"""One socket to the daemon: connect and handshake, then exchange frames.

:class:`Connection` writes a batch of request frames and reads their answers
at the same time (a pipeline larger than the socket buffers would otherwise
deadlock: the daemon stops reading while its answers are not read), all
under one deadline. It knows frames, not calls: matching answers to requests
is :mod:`rld.client`'s job. Not thread-safe; the client serialises use.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from typing import List, Optional, Tuple

from . import errors, wire
from .messages import ServerInfo

_CHUNK = 256 * 1024


def default_socket_path(environ: Optional[dict] = None, euid: Optional[int] = None) -> str:
    """The socket ``rlctl`` uses: ``$RLD_SOCKET`` if set; for a non-root user
    their own daemon's socket (``$XDG_RUNTIME_DIR/rld.sock``, else
    ``/tmp/rld-$UID/rld.sock``) if it exists; else ``/run/rld/rld.sock``."""
    env = os.environ if environ is None else environ
    if env.get("RLD_SOCKET"):
        return env["RLD_SOCKET"]
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        runtime = env.get("XDG_RUNTIME_DIR")
        user = os.path.join(runtime, "rld.sock") if runtime else f"/tmp/rld-{uid}/rld.sock"
        if os.path.exists(user):
            return user
    return "/run/rld/rld.sock"


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - time.monotonic()


class _TryVersion(Exception):
    """The daemon speaks only versions up to ``version``: greet again."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


class Connection:
    """A connected, greeted socket. Use :meth:`open`."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self.pid = os.getpid()
        self.server = ServerInfo(version=0, server="", max_frame=wire.DEFAULT_MAX_FRAME)
        self._buf = bytearray()
        self.closed = False

    @classmethod
    def open(
        cls, path: str, timeout: Optional[float], version: int = wire.PROTOCOL_VERSION
    ) -> "Connection":
        """Connects to ``path`` and performs the Hello handshake, all within
        ``timeout`` seconds (``None``: no limit).

        Raises:
            rld.ConnectionError: nothing listens there.
            rld.TimeoutError: no connection or no HelloOk in time.
            rld.RldError: the daemon refused (e.g. TooManyConnections,
                UnsupportedVersion).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except (socket.timeout, BlockingIOError):
            sock.close()
            raise errors.TimeoutError(
                f"connecting to rld at {path} took longer than {timeout}s"
            ) from None
        except OSError as e:
            sock.close()
            raise errors.ConnectionError(
                f"cannot connect to rld at {path}: {e.strerror or e}; is rld running? "
                "Start it, or pass the socket path or set RLD_SOCKET"
            ) from e
        sock.setblocking(False)
        conn = cls(sock, path)
        try:
            conn.server = conn._greet(deadline, version)
        except _TryVersion as older:
            # An older daemon: greet it again, on a new connection (it closed
            # this one), with the newest version both speak.
            conn.close()
            left = _remaining(deadline)
            return cls.open(path, None if left is None else max(left, 0.001), older.version)
        except errors.TimeoutError:
            conn.close()
            raise errors.TimeoutError(
                f"rld at {path} did not complete the handshake within {timeout}s"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _greet(self, deadline: Optional[float], version: int) -> ServerInfo:
        """Sends Hello for ``version`` and returns what the daemon answered
        (HelloOk, or Welcome from version 2); raises ``_TryVersion`` when the
        daemon speaks only older versions."""
        hello = wire.encode_request(wire.Frame(1, "Hello", version))
        frames, failure = self.exchange(hello, 1, deadline)
        if failure is not None:
            raise failure
        (frame,) = frames
        if frame.kind == "UnsupportedVersion" and frame.value.max_version < version:
            raise _TryVersion(frame.value.max_version)
        if frame.kind == "Error":
            err = errors.error_for(frame.value.code, frame.value.message)
            if isinstance(err, errors.UnsupportedVersion) and version > 1:
                # A version 1 daemon refuses any other version this way.
                raise _TryVersion(1)
            raise err
        if frame.kind == "Welcome" and frame.id == 1:
            w = frame.value
            return ServerInfo(version=w.version, server=w.server, max_frame=w.max_frame)
        if frame.kind != "HelloOk" or frame.id != 1:
            raise errors.ProtocolError(f"rld answered {frame.kind} (id {frame.id}) to Hello")
        if frame.value.version > version:
            raise errors.UnsupportedVersion(
                f"rld answered Hello with version {frame.value.version}, "
                f"this client asked for {version}"
            )
        return frame.value

    def close(self) -> None:
        """Closes the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def usable(self) -> bool:
        """Whether a request may be sent: open, in this process, and not closed
        by the daemon meanwhile (a restart, its idle timeout). Checked before
        sending, so a stale connection is replaced without losing a request."""
        if self.closed or self.pid != os.getpid():
            return False
        try:
            peek = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        # End of stream (b""), or bytes nobody asked for: start afresh.
        del peek
        return False

    def exchange(
        self, data: bytes, expected: int, deadline: Optional[float]
    ) -> Tuple[List[wire.Frame], Optional[errors.RldError]]:
        """Sends ``data`` (whole request frames) and reads up to ``expected``
        response frames, until ``deadline`` (a ``time.monotonic()`` value).

        Returns the frames read, in order, and why fewer arrived (``None`` if
        all did): a TimeoutError, a ConnectionError, a ProtocolError, or the
        error the daemon sent with id 0 before closing. After a failure the
        connection is closed.
        """
        frames: List[wire.Frame] = []
        view = memoryview(data)
        sent = 0
        write_error: Optional[OSError] = None
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if data else 0))
        try:
            while len(frames) < expected:
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    late = errors.TimeoutError(self._late(expected - len(frames)))
                    return frames, self._fail(late)
                for _, mask in sel.select(remaining):
                    if mask & selectors.EVENT_WRITE:
                        try:
                            sent += self.sock.send(view[sent : sent + _CHUNK])
                        except BlockingIOError:
                            pass
                        except OSError as e:
                            # Keep reading: the daemon may have said why it closed.
                            write_error = e
                            sent = len(data)
                        if sent == len(data):
                            sel.modify(self.sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        failure = self._read(frames, expected, write_error)
                        if failure is not None:
                            return frames, self._fail(failure)
            return frames, None
        finally:
            sel.close()
            view.release()

    def _late(self, missing: int) -> str:
        return (
            f"rld at {self.path} did not answer {missing} request(s) in time; "
            "the connection is dropped and the next call reconnects"
        )

    def _fail(self, failure: errors.RldError) -> errors.RldError:
        self.close()
        return failure

    def _read(
        self, frames: List[wire.Frame], expected: int, write_error: Optional[OSError]
    ) -> Optional[errors.RldError]:
        """Reads what is available and parses whole frames into ``frames``."""
        try:
            chunk = self.sock.recv(_CHUNK)
        except BlockingIOError:
            return None
        except OSError as e:
            return self._lost(expected - len(frames), e)
        if not chunk:
            return self._lost(expected - len(frames), write_error)
        buf = self._buf
        buf += chunk
        pos = 0
        try:
            while len(buf) - pos >= wire.HEADER_LEN:
                n = wire.frame_length(buf[pos : pos + wire.HEADER_LEN])
                if n > wire.MAX_RESPONSE_FRAME:
                    return errors.ProtocolError(
                        f"rld sent a frame of {n} bytes, "
                        f"above the {wire.MAX_RESPONSE_FRAME} maximum"
                    )
                end = pos + wire.HEADER_LEN + n
                if len(buf) < end:
                    break
                frame = wire.decode_response(bytes(buf[pos + wire.HEADER_LEN : end]))
                pos = end
                if frame.id == 0 and frame.kind == "Error":
                    # Not attributable to a request; the daemon closes now.
                    return errors.error_for(frame.value.code, frame.value.message)
                frames.append(frame)
        except errors.RldError as e:
            return e
        finally:
            del buf[:pos]
        return None

    def _lost(self, missing: int, cause: Optional[OSError]) -> errors.ConnectionError:
        why = f" ({cause.strerror or cause})" if cause is not None else ""
        return errors.ConnectionError(
            f"rld at {self.path} closed the connection{why} with {missing} request(s) "
            "unanswered (did the daemon stop or restart?); they may or may not have "
            "been applied; the next call reconnects"
        )
