"""Test helpers: find the rld binary, run a daemon on a private socket, and a
scripted fake daemon for what a real one will not do on demand.

Every wait here is on observable state (a readiness message, a process
exit, a socket event) and bounded in time; processes are only ever
signalled by their own PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from rld import wire

REPO_ROOT = Path(__file__).resolve().parents[3]
MAN_PAGE = REPO_ROOT / "man" / "rld-protocol.7"


def find_rld() -> Tuple[Optional[str], str]:
    """The rld binary to test: ``$RLD_BIN``, else ``<target dir>/debug/rld``
    with the target dir from ``cargo metadata`` in the repository root.
    Returns ``(path, "")`` or ``(None, why not)``."""
    explicit = os.environ.get("RLD_BIN")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit, ""
        return None, f"RLD_BIN={explicit} is not an executable file"
    try:
        out = subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        target = json.loads(out)["target_directory"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        return None, f"cannot ask cargo for the target directory ({e}); set RLD_BIN to the rld binary"
    path = os.path.join(target, "debug", "rld")
    if os.access(path, os.X_OK):
        return path, ""
    return None, f"{path} does not exist; build it with `cargo build` or set RLD_BIN"


def short_tempdir() -> str:
    """A fresh directory under /tmp: socket paths must stay under 108 bytes,
    which pytest's per-test directories can exceed."""
    return tempfile.mkdtemp(prefix="rld-py-", dir="/tmp")


# Variables that would make rld use another socket, config, state or etcd,
# or believe it runs under systemd socket activation.
_DAEMON_ENV_DROP = (
    "RLD_SOCKET",
    "RLD_CONFIG",
    "RLD_STATE_DIR",
    "RLD_ETCD",
    "RLD_LOG",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


class Daemon:
    """An rld process on ``<dir>/rld.sock`` with its own state directory and
    config file (never /etc/rld/rld.toml)."""

    READY_TIMEOUT = 20.0
    STOP_TIMEOUT = 10.0

    def __init__(self, binary: str, config: str = "", args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.dir = short_tempdir()
        self.socket = os.path.join(self.dir, "rld.sock")
        self.state_dir = os.path.join(self.dir, "state")
        self.config_path = os.path.join(self.dir, "rld.toml")
        self.args = list(args)
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        Path(self.config_path).write_text(config)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    def log(self) -> str:
        logs = sorted(Path(self.dir).glob("rld-*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def start(self) -> "Daemon":
        """Starts rld and returns once it has signalled readiness (sd_notify
        READY=1: socket bound, rules loaded)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        notify_path = os.path.join(self.dir, f"notify-{self.starts}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ENV_DROP}
        env.update(NOTIFY_SOCKET=notify_path, RLD_LOG="info")
        log = open(os.path.join(self.dir, f"rld-{self.starts}.log"), "wb")
        self.starts += 1
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--socket", self.socket, "--state-dir", self.state_dir,
                 "--config", self.config_path, *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            self._wait_ready(notify)
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()
            notify.close()
            os.unlink(notify_path)
        return self

    def _wait_ready(self, notify: socket.socket) -> None:
        deadline = time.monotonic() + self.READY_TIMEOUT
        notify.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                message = notify.recv(4096).decode(errors="replace")
            except socket.timeout:
                if self.proc.poll() is not None:
                    status = self.proc.returncode
                    raise RuntimeError(f"rld exited with {status} before ready:\n{self.log()}")
                continue
            if "READY=1" in message.split("\n"):
                return
        raise RuntimeError(f"rld not ready within {self.READY_TIMEOUT}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to this daemon's PID only."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP, then waits until every thread of rld is stopped (a signal
        takes effect asynchronously; a worker on another CPU could still
        answer meanwhile)."""
        self.signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not self._all_threads_stopped():
            assert time.monotonic() < deadline, "rld did not stop within 10s"
            time.sleep(0.001)

    def _all_threads_stopped(self) -> bool:
        states = []
        for stat in Path(f"/proc/{self.pid}/task").glob("*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue  # a thread that just exited
            states.append(text[text.rindex(")") + 2])
        return bool(states) and all(state in "Tt" for state in states)

    def resume(self) -> None:
        """SIGCONT."""
        self.signal(signal.SIGCONT)

    def stop(self) -> Optional[int]:
        """SIGTERM (after SIGCONT, in case it was stopped), then SIGKILL if it
        has not exited within STOP_TIMEOUT; reaps it. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(self.STOP_TIMEOUT)

    def restart(self) -> "Daemon":
        """Stops and starts again on the same socket and state directory."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class FakeConn:
    """The fake daemon's side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"client closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def read(self) -> wire.Frame:
        """The next request."""
        n = wire.frame_length(self._exactly(wire.HEADER_LEN))
        return wire.decode_request(self._exactly(n))

    def send(self, frame: wire.Frame) -> None:
        self.sock.sendall(wire.encode_response(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        """Reads Hello and answers HelloOk."""
        from rld import ServerInfo

        req = self.read()
        assert req.kind == "Hello", req
        self.send(wire.Frame(req.id, "HelloOk", ServerInfo(1, "fake", max_frame)))

    def at_eof(self) -> bool:
        """Whether the client closed its side (waits up to the socket timeout)."""
        return self.sock.recv(1) == b""


Handler = Callable[[FakeConn, int], None]


class FakeServer:
    """A scripted daemon on a Unix socket: ``handler(conn, n)`` serves the
    n-th accepted connection (at most ``max_connections``) in a thread.
    Handler failures are re-raised by :meth:`close`."""

    def __init__(self, path: str, handler: Handler, max_connections: int = 4) -> None:
        self.path = path
        self.handler = handler
        self.max_connections = max_connections
        self.accepted = 0
        self.failures: List[BaseException] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="fake-rld", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 60
        while self.accepted < self.max_connections and not self._stop.is_set():
            if time.monotonic() > deadline:
                self.failures.append(TimeoutError("fake server ran for 60s"))
                return
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            n = self.accepted
            self.accepted += 1
            with sock:
                try:
                    self.handler(FakeConn(sock), n)
                except BaseException as e:  # reported by close()
                    self.failures.append(e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._listener.close()
        assert not self._thread.is_alive(), "fake server thread did not finish"
        if self.failures:
            raise self.failures[0]
