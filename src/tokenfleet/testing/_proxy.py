"""A TCP proxy that injects network faults between a client and Redis.

`ChaosProxy` listens on a loopback port and relays every connection to a
target.  Its mode can be switched at any moment, and the switch applies to
connections already open as well as to new ones:

- forward: bytes pass unchanged;
- delay: every chunk, in both directions, arrives *seconds* late;
- blackhole: bytes are read and dropped, so peers wait until they time out;
- refuse: the listening socket is closed (connection refused) and open
  connections are reset.

`cut` resets the open connections without changing the mode.

The proxy runs on an asyncio event loop: the test's own (``async with``), or
a private loop in a daemon thread (`start_in_thread`, or ``with``) for
synchronous callers.  Mode switches may come from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import socket
import struct
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType

from tokenfleet.testing._threaded import LoopThread

__all__ = ["ChaosProxy"]

_CHUNK_SIZE = 65536
# Chunks read but not yet delivered, per direction, before reading pauses.
_IN_FLIGHT_CHUNKS = 64
_THREAD_TIMEOUT = 10.0


class _Mode(enum.Enum):
    FORWARD = "forward"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@dataclass(eq=False)
class _Link:
    """One relayed connection: the client's side and the target's side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)

    async def close(self) -> None:
        for side in (self.client, self.upstream):
            side.close()
            with suppress(OSError):
                await side.wait_closed()


class ChaosProxy:
    """A fault-injecting TCP proxy from a loopback port to *target*.

    Start it with ``async with ChaosProxy(...)`` inside a running event loop,
    or with `start_in_thread` (or a plain ``with``) from synchronous code.
    Point clients at `url` and switch modes with `forward`, `delay`,
    `blackhole`, `refuse` and `cut`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._target_host = target_host
        self._target_port = target_port
        self._host = host
        self._port = port
        self._mode = _Mode.FORWARD
        self._latency = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._sessions: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        target = f"{self._target_host}:{self._target_port}"
        return f"ChaosProxy(port={self._port}, target={target}, mode={self.mode})"

    @property
    def port(self) -> int:
        """The port clients connect to (chosen at `start` when 0 was given)."""
        if self._port == 0:
            msg = "The chaos proxy has no port yet: start it first."
            raise RuntimeError(msg)

        return self._port

    @property
    def url(self) -> str:
        """A redis-py URL for database 0 through the proxy."""
        return f"redis://{self._host}:{self.port}/0"

    @property
    def mode(self) -> str:
        """The current mode: forward, delay, blackhole or refuse."""
        return self._mode.value

    @property
    def connections(self) -> int:
        """How many client connections are currently relayed."""
        return len(self._links)

    async def start(self) -> None:
        """Listen on the proxy port, on the running event loop."""
        if self._loop is not None:
            msg = f"The chaos proxy on port {self._port} is already running."
            raise RuntimeError(msg)

        self._loop = asyncio.get_running_loop()
        self._open_listener()
        if self._mode is _Mode.REFUSE:
            self._close_listener()

    async def stop(self) -> None:
        """Stop listening, reset every connection and wait for the relays."""
        if self._loop is None:
            return

        self._close_listener()
        self._reset_links()
        sessions = list(self._sessions)
        for session in sessions:
            session.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

        self._loop = None

    def start_in_thread(self) -> None:
        """Start the proxy on a private event loop in a daemon thread."""
        if self._loop is not None:
            msg = f"The chaos proxy on port {self._port} is already running."
            raise RuntimeError(msg)

        thread = LoopThread("tokenfleet-chaos-proxy")
        try:
            thread.call(self.start(), timeout=_THREAD_TIMEOUT)
        except BaseException:
            thread.close()
            raise
        self._thread = thread

    def stop_in_thread(self) -> None:
        """Stop a proxy started with `start_in_thread` and end its thread."""
        thread = self._thread
        if thread is None or self._loop is None:
            return

        thread.call(self.stop(), timeout=_THREAD_TIMEOUT)
        thread.close(timeout=_THREAD_TIMEOUT)
        self._thread = None

    def forward(self) -> None:
        """Relay bytes unchanged (and listen again after `refuse`)."""
        self._on_loop(lambda: self._switch(_Mode.FORWARD, latency=0.0))

    def delay(self, seconds: float) -> None:
        """Deliver every chunk, in both directions, *seconds* late."""
        if seconds < 0:
            msg = f"The proxy delay must not be negative, got {seconds!r} seconds."
            raise ValueError(msg)

        self._on_loop(lambda: self._switch(_Mode.DELAY, latency=seconds))

    def blackhole(self) -> None:
        """Accept and read, but drop every byte in both directions."""
        self._on_loop(lambda: self._switch(_Mode.BLACKHOLE, latency=0.0))

    def refuse(self) -> None:
        """Stop listening, so connecting is refused, and reset open links."""
        self._on_loop(lambda: self._switch(_Mode.REFUSE, latency=0.0))

    def cut(self) -> None:
        """Reset every open connection now; the mode stays as it is."""
        self._on_loop(self._reset_links)

    async def __aenter__(self) -> ChaosProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> ChaosProxy:
        self.start_in_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_in_thread()

    def _on_loop(self, change: Callable[[], None]) -> None:
        """Apply *change* on the proxy's loop and return once it is done."""
        loop = self._loop
        if loop is None or _running_loop() is loop:
            change()
            return

        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            try:
                change()
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(apply)
        done.result(timeout=_THREAD_TIMEOUT)

    def _switch(self, mode: _Mode, *, latency: float) -> None:
        self._mode = mode
        self._latency = latency
        if self._loop is None:
            return

        if mode is _Mode.REFUSE:
            self._close_listener()
            self._reset_links()
        elif self._listener is None:
            self._open_listener()

    def _open_listener(self) -> None:
        # A socket of our own, watched with add_reader, lets a mode switch
        # stop and resume listening synchronously, which asyncio's Server
        # cannot do.
        loop = self._loop
        assert loop is not None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            msg = (
                f"The chaos proxy could not listen on {self._host}:{self._port}: {exc}."
            )
            raise RuntimeError(msg) from exc

        self._port = listener.getsockname()[1]
        loop.add_reader(listener.fileno(), self._accept_ready)
        self._listener = listener

    def _close_listener(self) -> None:
        listener, loop = self._listener, self._loop
        if listener is None or loop is None:
            return

        # Closing the socket also resets connections still in the backlog.
        loop.remove_reader(listener.fileno())
        listener.close()
        self._listener = None

    def _reset_links(self) -> None:
        for link in self._links:
            link.reset()
        self._links.clear()

    def _accept_ready(self) -> None:
        loop = self._loop
        while self._listener is not None and loop is not None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                # Nothing left to accept (BlockingIOError), or the client
                # gave up before being accepted.
                return

            session = loop.create_task(self._serve(conn))
            self._sessions.add(session)
            session.add_done_callback(self._sessions.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            client_reader, client_writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        except BaseException:
            conn.close()
            raise

        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self._target_host, self._target_port
            )
        except OSError:
            # The target is down: the client sees its connection dropped.
            _reset(client_writer)
            return
        except BaseException:
            _reset(client_writer)
            raise

        link = _Link(client_writer, upstream_writer)
        if self._mode is _Mode.REFUSE:
            link.reset()
            return
        self._links.add(link)

        try:
            await self._relay(client_reader, upstream_reader, link)
        finally:
            self._links.discard(link)
            await link.close()

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        upstream_reader: asyncio.StreamReader,
        link: _Link,
    ) -> None:
        directions = [
            asyncio.create_task(self._carry(client_reader, link.upstream)),
            asyncio.create_task(self._carry(upstream_reader, link.client)),
        ]

        # When either side closes, the connection as a whole is over.
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)

    async def _carry(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        # Reading and delivering run apart so that a delay is pure latency:
        # chunks keep flowing in, each one leaving when its own time comes.
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_IN_FLIGHT_CHUNKS)
        delivery = asyncio.create_task(self._deliver(in_flight, sink))

        try:
            await self._collect(source, in_flight)
            await delivery
        finally:
            delivery.cancel()
            await asyncio.gather(delivery, return_exceptions=True)

    async def _collect(
        self,
        source: asyncio.StreamReader,
        in_flight: asyncio.Queue[tuple[float, bytes]],
    ) -> None:
        loop = asyncio.get_running_loop()

        while True:
            try:
                chunk = await source.read(_CHUNK_SIZE)
            except OSError:
                chunk = b""

            if self._mode is _Mode.BLACKHOLE and chunk:
                continue
            # An empty chunk marks the end of the stream for the delivery.
            await in_flight.put((loop.time() + self._latency, chunk))
            if not chunk:
                return

    async def _deliver(
        self, in_flight: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()

        while True:
            due, chunk = await in_flight.get()
            if not chunk:
                return

            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # A chunk still in flight when the blackhole opens is lost too.
            if self._mode is _Mode.BLACKHOLE:
                continue

            sink.write(chunk)
            try:
                await sink.drain()
            except OSError:
                return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort *writer*'s connection with a TCP reset rather than a FIN."""
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    writer.transport.abort()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
