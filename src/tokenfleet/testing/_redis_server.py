"""A private, throwaway ``redis-server`` process for tests and benchmarks.

Each `RedisServer` runs its own ``redis-server`` child on a free loopback
port with persistence switched off and a fresh temporary directory, so tests
never touch a shared Redis and a restart always comes back empty.  The
process can be killed (a crash), paused (a hung server) and restarted on the
same port, which is what failure tests need.

Servers still running when the interpreter exits are stopped by an `atexit`
hook, so a test run that dies half-way leaves no orphan behind.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "find_redis_server"]

_HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 20

# Servers that may still own a process or a temporary directory; the atexit
# hook below stops whatever a crashed test run left in here.
_live_servers: set[RedisServer] = set()


def find_redis_server() -> str:
    """Return the path of the ``redis-server`` binary found on PATH.

    Raises RuntimeError, saying how to install it, when there is none.
    """
    path = shutil.which("redis-server")
    if path is None:
        msg = (
            "No redis-server binary was found on PATH; install Redis "
            "(Debian/Ubuntu: 'sudo apt-get install redis-server', macOS: "
            "'brew install redis') and make sure redis-server is on PATH."
        )
        raise RuntimeError(msg)

    return path


class _PortClashError(Exception):
    """The port was taken by someone else between choosing and binding it."""


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1, owned by this object.

    Use it as a context manager (``with RedisServer() as server:``) or call
    `start` and `stop`.  Without an explicit *port* a free one is chosen, and
    another is tried if that one is taken before Redis binds it.  `kill`,
    `pause` and `restart` simulate a crash, a hang and a recovery; nothing
    is persisted, so a restarted server is empty.
    """

    host = _HOST

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._binary = binary if binary is not None else find_redis_server()
        self._extra_args = tuple(extra_args)
        self._port_pinned = port is not None
        self._port = port if port is not None else _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_offset = 0
        self._paused = False

    def __repr__(self) -> str:
        return f"RedisServer(port={self._port}, running={self.running})"

    @staticmethod
    def available() -> bool:
        """Tell whether a ``redis-server`` binary is on PATH."""
        return shutil.which("redis-server") is not None

    @property
    def port(self) -> int:
        """The TCP port the server listens on (kept across `kill`/`restart`)."""
        return self._port

    @property
    def url(self) -> str:
        """A redis-py URL for database 0 of this server."""
        return f"redis://{_HOST}:{self._port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused server is still running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        """Whether the process is stopped by `pause`."""
        return self._paused and self.running

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the server and block until it answers, at most 10 seconds."""
        self._start(may_move=not self._port_pinned)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory.

        Calling it again, or on a server never started, does nothing.
        """
        self._terminate()

        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        _live_servers.discard(self)

    def kill(self) -> None:
        """SIGKILL the server now, as a crash would; the port is kept."""
        process = self._process
        if process is None:
            return

        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None
        self._paused = False

    def restart(self) -> None:
        """Start the server again on the same port; all keys are gone."""
        self._terminate()
        self._start(may_move=False)

    def pause(self) -> None:
        """SIGSTOP the server: connections open but nothing is answered."""
        process = self._running_process("pause")
        process.send_signal(signal.SIGSTOP)
        self._paused = True

        # The signal is asynchronous; wait until the kernel has stopped the
        # process so the caller's next request meets a hung server for sure.
        _await_stopped(process.pid)

    def resume(self) -> None:
        """SIGCONT a paused server; queued requests are answered."""
        process = self._running_process("resume")
        process.send_signal(signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self, *, may_move: bool) -> None:
        if self.running:
            msg = f"The redis-server on port {self._port} is already running."
            raise RuntimeError(msg)

        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="tokenfleet-redis-"))
        _live_servers.add(self)

        # A server that fails to start keeps neither a process nor a directory.
        try:
            self._launch_until_bound(may_move=may_move)
        except BaseException:
            self.stop()
            raise

    def _launch_until_bound(self, *, may_move: bool) -> None:
        for _ in range(_PORT_ATTEMPTS):
            try:
                self._launch()
                return
            except _PortClashError:
                if not may_move:
                    break
                self._port = _free_port()

        msg = (
            f"redis-server could not listen on {_HOST}:{self._port} because "
            f"the port is taken: {self._log_tail()}"
        )
        raise RuntimeError(msg)

    def _launch(self) -> None:
        workdir = self._workdir
        assert workdir is not None
        log = workdir / "redis.log"
        self._log_offset = log.stat().st_size if log.exists() else 0

        command = [
            self._binary,
            *("--port", str(self._port), "--bind", _HOST),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
            *("--protected-mode", "no", "--daemonize", "no"),
            *("--loglevel", "warning", "--logfile", str(log)),
            *self._extra_args,
        ]
        # Errors in the arguments are printed before the logfile is opened.
        with (workdir / "console.log").open("ab") as console:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        self._paused = False

        self._await_ready()

    def _await_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + _START_TIMEOUT

        while time.monotonic() < deadline:
            status = process.poll()
            if status is not None:
                self._process = None
                tail = self._log_tail()
                if "Address already in use" in tail:
                    raise _PortClashError
                msg = (
                    f"redis-server exited with status {status} on port "
                    f"{self._port} before answering: {tail}"
                )
                raise RuntimeError(msg)

            # Comparing process ids makes sure the answer does not come from
            # another server that took the port first.
            if _server_pid(self._port) == process.pid:
                return
            time.sleep(0.01)

        self.kill()
        msg = (
            f"redis-server on port {self._port} did not answer within "
            f"{_START_TIMEOUT:.0f} s: {self._log_tail()}"
        )
        raise RuntimeError(msg)

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return

        if process.poll() is None:
            # A stopped process would hold the SIGTERM until it is continued.
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        self._paused = False

    def _running_process(self, action: str) -> subprocess.Popen[bytes]:
        process = self._process
        if process is None or process.poll() is not None:
            msg = (
                f"Cannot {action} the redis-server on port {self._port}: "
                "it is not running."
            )
            raise RuntimeError(msg)

        return process

    def _log_tail(self) -> str:
        if self._workdir is None:
            return "(no log)"

        lines: list[str] = []
        for name, offset in (("console.log", 0), ("redis.log", self._log_offset)):
            path = self._workdir / name
            if path.exists():
                with path.open("rb") as log:
                    log.seek(offset)
                    text = log.read().decode("utf-8", "replace")
                lines.extend(text.splitlines())

        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        port: int = probe.getsockname()[1]

    return port


def _server_pid(port: int) -> int | None:
    """Ask whatever listens on *port* for its process id, or None."""
    try:
        with socket.create_connection((_HOST, port), timeout=0.1) as conn:
            conn.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None

    for line in reply.decode("ascii", "replace").splitlines():
        if line.startswith("process_id:"):
            with suppress(ValueError):
                return int(line.removeprefix("process_id:"))
    return None


def _await_stopped(pid: int) -> None:
    """Wait until Linux reports *pid* stopped; elsewhere return at once."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 1.0

    while time.monotonic() < deadline:
        try:
            # The state follows the parenthesised command name.
            state = stat.read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return
        if state == "T":
            return
        time.sleep(0.001)


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_live_servers):
        server.stop()
