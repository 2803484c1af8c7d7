"""Real components for testing code that uses tokenfleet.

`FakeIdP` is an Okta-like token endpoint on a loopback port, `RedisServer`
runs a private ``redis-server`` process, and `ChaosProxy` sits between a
client and Redis to delay, blackhole or cut its traffic on demand.
"""

from ._fake_idp import FakeClient, FakeIdP, IdPRequest, ScriptedFailure
from ._proxy import ChaosProxy
from ._redis_server import RedisServer, find_redis_server

__all__ = [
    "ChaosProxy",
    "FakeClient",
    "FakeIdP",
    "IdPRequest",
    "RedisServer",
    "ScriptedFailure",
    "find_redis_server",
]
