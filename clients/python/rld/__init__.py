"""Python client for rld, the rate-limiter daemon.

::

    import rld

    client = rld.Client()                      # $RLD_SOCKET or the default socket
    d = client.acquire("alice", "api/search")
    if not d.allowed:
        print(f"retry in {d.retry_after:.2f}s (rule {d.rule})")

    with client.limit("alice", "jobs/backup"):  # raises rld.RateLimited when denied
        run_backup()

Modules: :mod:`rld.client` (Client, Pipeline), :mod:`rld.gate` (limit/gate),
:mod:`rld.connection` (socket, handshake, frame exchange), :mod:`rld.wire`
(protocol v1 message layouts), :mod:`rld.postcard` (the encoding),
:mod:`rld.messages` (values), :mod:`rld.errors` (exceptions).

Durations are float seconds everywhere (``retry_after``, ``window``,
timeouts); the exact integer nanoseconds of the wire are kept in ``*_ns``
fields. Standard library only; Python 3.9 or newer.
"""

from .client import DEFAULT_TIMEOUT, Client, Pipeline
from .connection import default_socket_path
from .errors import (
    CODE_NAMES,
    ConnectionError,
    CostExceedsBurst,
    FrameTooLarge,
    HandshakeRequired,
    InternalError,
    InvalidArgument,
    InvalidRequest,
    InvalidRule,
    MalformedFrame,
    PermissionDenied,
    ProtocolError,
    RateLimited,
    RldError,
    RuleNotFound,
    RuleReadOnly,
    ShuttingDown,
    StorageFailed,
    TimeoutError,
    TooManyConnections,
    Unavailable,
    UnknownRequest,
    UnsupportedVersion,
)
from .gate import Gate
from .messages import (
    Accuracy,
    Acquire,
    ClockReport,
    ClusterStats,
    ShareStats,
    Decision,
    EtcdHealth,
    Explanation,
    GlobalRuleStats,
    HealthReport,
    LatencySummary,
    LeaseInfo,
    OnFailure,
    Outcome,
    PeerClock,
    Per,
    Priority,
    Reserve,
    RuleCounters,
    RuleExplained,
    RuleInfo,
    RuleSource,
    RuleSpec,
    Scope,
    ServerInfo,
    ServingState,
    StatsReport,
    TraceContext,
)
from .wire import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "CODE_NAMES",
    "DEFAULT_TIMEOUT",
    "PROTOCOL_VERSION",
    "Accuracy",
    "Acquire",
    "Explanation",
    "Per",
    "RuleExplained",
    "Client",
    "ClockReport",
    "ClusterStats",
    "ShareStats",
    "ConnectionError",
    "CostExceedsBurst",
    "Decision",
    "EtcdHealth",
    "FrameTooLarge",
    "Gate",
    "GlobalRuleStats",
    "HandshakeRequired",
    "HealthReport",
    "InternalError",
    "InvalidArgument",
    "InvalidRequest",
    "InvalidRule",
    "LatencySummary",
    "LeaseInfo",
    "MalformedFrame",
    "OnFailure",
    "Outcome",
    "PeerClock",
    "PermissionDenied",
    "Pipeline",
    "Priority",
    "ProtocolError",
    "RateLimited",
    "Reserve",
    "RldError",
    "RuleCounters",
    "RuleInfo",
    "RuleNotFound",
    "RuleReadOnly",
    "RuleSource",
    "RuleSpec",
    "Scope",
    "ServerInfo",
    "ServingState",
    "ShuttingDown",
    "StatsReport",
    "StorageFailed",
    "TimeoutError",
    "TooManyConnections",
    "TraceContext",
    "Unavailable",
    "UnknownRequest",
    "UnsupportedVersion",
    "default_socket_path",
]
