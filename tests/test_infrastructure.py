"""The test infrastructure itself: private redis-server processes and the
fault-injecting proxy, exercised with real processes and real sockets."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from tokenfleet.testing._proxy import ChaosProxy
from tokenfleet.testing._redis_server import RedisServer

# Short enough to keep the suite fast, long enough for a loaded 2-core box.
COMMAND_TIMEOUT = 0.2


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server, stopped after the test."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def proxied_server() -> Iterator[RedisServer]:
    """One private redis-server behind every proxy of this module.

    The proxy tests never kill or pause it, and sharing it saves the tenth of
    a second each redis-server takes to shut down.
    """
    with RedisServer() as server:
        yield server


@pytest.fixture
async def proxy(proxied_server: RedisServer) -> AsyncIterator[ChaosProxy]:
    """A chaos proxy in forward mode in front of the shared server."""
    async with ChaosProxy(proxied_server.host, proxied_server.port) as chaos:
        yield chaos


def sync_client(url: str) -> redis.Redis:
    """A synchronous client that fails at once instead of retrying."""
    return redis.Redis.from_url(
        url,
        socket_timeout=COMMAND_TIMEOUT,
        retry=redis.retry.Retry(NoBackoff(), 0),
    )


def async_client(
    url: str, *, timeout: float = COMMAND_TIMEOUT, single_connection: bool = False
) -> redis.asyncio.Redis:
    """An asyncio client that fails at once instead of retrying.

    With *single_connection* every command goes over one connection, which
    the pool would otherwise replace behind the test's back.
    """
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        single_connection_client=single_connection,
    )


def accepts_connections(port: int) -> bool:
    """Whether something listens on the loopback *port*."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except ConnectionRefusedError:
        return False


def test_started_server_stores_keys(redis_server: RedisServer) -> None:
    """A started server answers commands at its url."""
    with sync_client(redis_server.url) as client:
        client.set("fleet", "ready")

        assert client.get("fleet") == b"ready"


def test_stop_leaves_no_process() -> None:
    """After stop the process is reaped and the port is closed."""
    server = RedisServer()
    server.start()
    pid = server.pid
    assert pid is not None

    server.stop()

    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not accepts_connections(server.port)


def test_stop_twice_is_harmless() -> None:
    """A second stop does nothing and raises nothing."""
    server = RedisServer()
    server.start()
    server.stop()

    server.stop()

    assert not server.running


def test_start_moves_to_another_port_when_its_port_is_taken() -> None:
    """An unpinned server retries on a free port when its port is taken."""
    server = RedisServer()
    first_choice = server.port

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first_choice))
        squatter.listen()
        server.start()

    try:
        assert server.port != first_choice
        with sync_client(server.url) as client:
            assert client.ping()
    finally:
        server.stop()


def test_pinned_port_taken_is_a_clear_error(redis_server: RedisServer) -> None:
    """A server pinned to a busy port fails naming that port."""
    clash = RedisServer(port=redis_server.port)

    try:
        with pytest.raises(RuntimeError, match=str(redis_server.port)):
            clash.start()
    finally:
        clash.stop()


def test_restart_after_kill_reuses_port_and_loses_keys(
    redis_server: RedisServer,
) -> None:
    """kill drops everything; restart comes back empty on the same port."""
    port = redis_server.port
    with sync_client(redis_server.url) as client:
        client.set("fleet", "ready")

        redis_server.kill()
        assert not redis_server.running
        assert not accepts_connections(port)

        redis_server.restart()
        assert redis_server.port == port
        assert client.get("fleet") is None


def test_paused_server_makes_commands_time_out(redis_server: RedisServer) -> None:
    """A paused server accepts connections but never answers."""
    with sync_client(redis_server.url) as client:
        redis_server.pause()

        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()

        redis_server.resume()


def test_resumed_server_answers_again(redis_server: RedisServer) -> None:
    """After resume the same client gets answers again."""
    with sync_client(redis_server.url) as client:
        redis_server.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()

        redis_server.resume()

        assert client.ping()


@pytest.mark.anyio
async def test_forward_relays_commands(proxy: ChaosProxy) -> None:
    """In forward mode commands through the proxy reach Redis."""
    client = async_client(proxy.url)

    try:
        await client.set("fleet", "ready")
        assert await client.get("fleet") == b"ready"
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_connections_counts_open_clients(proxy: ChaosProxy) -> None:
    """connections follows the client connections currently relayed."""
    client = async_client(proxy.url)

    try:
        await client.ping()
        assert proxy.connections == 1
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_blackhole_makes_commands_time_out(proxy: ChaosProxy) -> None:
    """A blackholed connection swallows the command and never answers."""
    client = async_client(proxy.url)
    await client.ping()

    proxy.blackhole()

    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.get("fleet")
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_forward_after_blackhole_serves_new_connections(
    proxy: ChaosProxy,
) -> None:
    """Switching back to forward lets a new connection work."""
    proxy.blackhole()
    stranded = async_client(proxy.url)
    with pytest.raises(redis.exceptions.TimeoutError):
        await stranded.ping()
    await stranded.aclose()

    proxy.forward()

    client = async_client(proxy.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_refuse_fails_connecting_quickly(proxy: ChaosProxy) -> None:
    """With refuse a new connection is rejected at once, not timed out."""
    proxy.refuse()
    client = async_client(proxy.url)
    started = time.perf_counter()

    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()

    assert time.perf_counter() - started < COMMAND_TIMEOUT


@pytest.mark.anyio
async def test_refuse_resets_open_connections(proxy: ChaosProxy) -> None:
    """refuse also drops the connections already open."""
    client = async_client(proxy.url, single_connection=True)
    await client.ping()

    proxy.refuse()

    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_forward_after_refuse_listens_on_the_same_port(
    proxy: ChaosProxy,
) -> None:
    """Leaving refuse mode accepts connections on the original port again."""
    port = proxy.port
    proxy.refuse()

    proxy.forward()

    client = async_client(proxy.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    assert proxy.port == port


@pytest.mark.anyio
async def test_cut_drops_open_connections(proxy: ChaosProxy) -> None:
    """cut resets every open connection at once."""
    client = async_client(proxy.url, single_connection=True)
    await client.ping()
    assert proxy.connections == 1

    proxy.cut()

    assert proxy.connections == 0
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_cut_keeps_accepting_new_connections(proxy: ChaosProxy) -> None:
    """After cut, new connections are relayed in the current mode."""
    dropped = async_client(proxy.url)
    await dropped.ping()
    proxy.cut()
    await dropped.aclose()

    client = async_client(proxy.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_delay_adds_latency_both_ways(proxy: ChaosProxy) -> None:
    """A command's round trip takes the delay once each way."""
    latency = 0.1
    client = async_client(proxy.url, timeout=10 * latency)
    await client.ping()

    proxy.delay(latency)
    started = time.perf_counter()
    try:
        await client.ping()
    finally:
        await client.aclose()

    assert time.perf_counter() - started >= 2 * latency


def test_thread_hosted_proxy_switches_modes_from_sync_code(
    proxied_server: RedisServer,
) -> None:
    """A proxy on its own thread obeys mode switches made synchronously."""
    chaos = ChaosProxy(proxied_server.host, proxied_server.port)

    with chaos, sync_client(chaos.url) as client:
        chaos.blackhole()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()

        chaos.forward()
        assert client.ping()


def test_thread_hosted_proxy_reports_a_taken_port_and_ends_its_thread(
    proxied_server: RedisServer,
) -> None:
    """A proxy that cannot listen raises in the caller and leaves no thread."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        chaos = ChaosProxy(proxied_server.host, proxied_server.port, port=port)

        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            chaos.start_in_thread()

    assert "tokenfleet-chaos-proxy" not in {t.name for t in threading.enumerate()}
