"""The values of protocol v1: what requests carry and answers contain.

Plain frozen dataclasses and enums, mirroring ``src/protocol/message.rs`` and
``src/rule/mod.rs`` field for field (the wire order is declared in
:mod:`rld.wire`). No I/O here.

Durations: the wire carries integer nanoseconds, kept exact in the ``*_ns``
fields; each also has a property in float seconds without the suffix
(``retry_after``, ``window``, ``uptime``...). Arguments that take a duration
accept seconds as an ``int`` or ``float``, or a :class:`datetime.timedelta`.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import List, Optional, Union

NANOS_PER_SECOND = 1_000_000_000

Duration = Union[int, float, datetime.timedelta]
"""Seconds (``int`` or ``float``) or a ``timedelta``."""


def duration_ns(value: Duration, what: str) -> int:
    """``value`` as integer nanoseconds.

    Raises:
        TypeError: not a number or a timedelta.
        ValueError: negative.
    """
    if isinstance(value, datetime.timedelta):
        ns = (value.days * 86_400 + value.seconds) * NANOS_PER_SECOND + value.microseconds * 1000
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be seconds (int or float) or a timedelta, not {value!r}")
    elif isinstance(value, int):
        ns = value * NANOS_PER_SECOND
    else:
        ns = round(value * NANOS_PER_SECOND)
    if ns < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return ns


def _seconds(ns: Optional[int]) -> Optional[float]:
    return None if ns is None else ns / NANOS_PER_SECOND


class WireEnum(str, enum.Enum):
    """An enum sent as its index in declaration order; its value is the
    lowercase name the daemon and rlctl use."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "WireEnum"]) -> "WireEnum":
        """A member from itself or its name (``"normal"``).

        Raises:
            ValueError: not one of the names.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls.__name__} {value!r}; use one of {names}") from None


class Priority(WireEnum):
    """Request priority. Lower classes stop at their rule's reserve floor;
    ``critical`` is never denied but is counted, debited and answered with
    outcome ``bypassed`` when over the limit."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


class Outcome(WireEnum):
    """What happened to an acquire."""

    ALLOWED = "allowed"
    DENIED = "denied"
    BYPASSED = "bypassed"
    """A critical request admitted over the limit (still debited)."""


class Scope(WireEnum):
    """Where a rule's bucket lives: each host (local) or shared via etcd (global)."""

    LOCAL = "local"
    GLOBAL = "global"


class OnFailure(WireEnum):
    """What a global rule does while etcd is unreachable."""

    OPEN = "open"
    CLOSED = "closed"
    LOCAL = "local"


class Per(WireEnum):
    """What a rule's buckets are keyed by (protocol version 3): one per
    (client, resource) pair, per client, per resource, or one for everything
    the rule matches. Rules keyed alike override one another by specificity;
    rules keyed differently all apply."""

    CLIENT_RESOURCE = "client,resource"
    CLIENT = "client"
    RESOURCE = "resource"
    NONE = "none"


class RuleSource(WireEnum):
    """Where a rule came from: the config file (read-only over the socket),
    set at run time, or stored in etcd."""

    CONFIG = "config"
    RUNTIME = "runtime"
    ETCD = "etcd"


class ServingState(WireEnum):
    """The daemon's overall state."""

    OK = "ok"
    DEGRADED = "degraded"
    STOPPING = "stopping"


@dataclass(frozen=True)
class TraceContext:
    """A W3C ``traceparent`` in binary form, to link the caller's trace to
    the daemon's spans."""

    trace_id: bytes
    span_id: bytes
    flags: int = 1

    @classmethod
    def parse(cls, traceparent: str) -> "TraceContext":
        """Parses ``00-<32 hex>-<16 hex>-<2 hex>``.

        Raises:
            ValueError: not a version-00 traceparent with non-zero ids.
        """
        bad = ValueError(
            f"{traceparent!r} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
        )
        parts = traceparent.split("-") if isinstance(traceparent, str) else []
        if len(parts) != 4 or parts[0] != "00":
            raise bad
        try:
            trace_id, span_id, flags = (bytes.fromhex(p) for p in parts[1:])
        except ValueError:
            raise bad from None
        widths = (len(trace_id), len(span_id), len(flags))
        if widths != (16, 8, 1) or [len(p) for p in parts[1:]] != [32, 16, 2]:
            raise bad
        if not any(trace_id) or not any(span_id):
            raise bad
        return cls(trace_id, span_id, flags[0])

    def __str__(self) -> str:
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{self.flags:02x}"


@dataclass(frozen=True)
class Acquire:
    """One acquire: may ``client`` use ``resource`` now, spending ``cost``
    tokens? A cost of 0 asks without spending. Also an item of
    :meth:`rld.Client.acquire_many`."""

    client: str
    resource: str
    cost: int = 1
    priority: Priority = Priority.NORMAL
    trace: Optional[TraceContext] = None
    """A :class:`TraceContext`; a traceparent string is parsed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", Priority.parse(self.priority))
        if isinstance(self.trace, str):
            object.__setattr__(self, "trace", TraceContext.parse(self.trace))


@dataclass(frozen=True)
class ServerInfo:
    """The daemon's handshake answer (``HelloOk``)."""

    version: int
    server: str
    max_frame: int
    """Largest request frame the daemon accepts, in bytes (header excluded)."""


@dataclass(frozen=True)
class Welcome:
    """The handshake answer from protocol version 2: the versions the daemon
    speaks and the optional behaviours it offers. (The client keeps the
    version, server name and frame limit as its ``ServerInfo``.)"""

    version: int
    min_version: int
    max_version: int
    server: str
    max_frame: int
    capabilities: List[str]


@dataclass(frozen=True)
class VersionRange:
    """``UnsupportedVersion``: the version asked and the range the daemon
    speaks (sent to clients that greet with version 2 or later)."""

    requested: int
    min_version: int
    max_version: int


@dataclass(frozen=True)
class Decision:
    """The answer to one acquire. A denial is a normal outcome, not an error."""

    outcome: Outcome
    limit: int
    """The rule's limit per window (0 when no rule matched)."""
    remaining: int
    """Whole tokens left in the bucket after this decision."""
    retry_after_ns: int
    """When denied: nanoseconds until the same request would be allowed."""
    reset_after_ns: int
    """Nanoseconds until the bucket is full again."""
    rule: str
    """The rule that decided; empty when none matched and the default applied."""

    @property
    def allowed(self) -> bool:
        """Allowed or bypassed: the caller may go ahead."""
        return self.outcome is not Outcome.DENIED

    @property
    def retry_after(self) -> float:
        """Seconds until the same request would be allowed (0 unless denied)."""
        return self.retry_after_ns / NANOS_PER_SECOND

    @property
    def reset_after(self) -> float:
        """Seconds until the bucket is full again."""
        return self.reset_after_ns / NANOS_PER_SECOND


@dataclass(frozen=True)
class ErrorBody:
    """An error answer as it travels (the client raises it as an
    :class:`rld.RldError` subclass)."""

    code: int
    message: str


@dataclass(frozen=True)
class Reserve:
    """Per-priority reserve floors, in thousandths of the bucket (100 = 10%):
    a request of that class is denied if it would leave fewer tokens.
    Must satisfy ``high <= normal <= low < 1000``."""

    high: int = 0
    normal: int = 0
    low: int = 0


@dataclass(frozen=True, init=False)
class Accuracy:
    """Over-admission a global rule allows: ``error_bp / 10000`` of the limit
    over any ``horizon``."""

    error_bp: int
    """Allowed error in basis points (200 = 2%)."""
    horizon_ns: int

    def __init__(
        self,
        error_bp: int,
        horizon: Optional[Duration] = None,
        *,
        horizon_ns: Optional[int] = None,
    ) -> None:
        object.__setattr__(self, "error_bp", error_bp)
        object.__setattr__(self, "horizon_ns", _one_duration("horizon", horizon, horizon_ns))

    @property
    def horizon(self) -> float:
        """The horizon in seconds."""
        return self.horizon_ns / NANOS_PER_SECOND


def _one_duration(name: str, seconds: Optional[Duration], ns: Optional[int]) -> int:
    if (seconds is None) == (ns is None):
        raise TypeError(f"give exactly one of {name} (seconds) and {name}_ns")
    return ns if ns is not None else duration_ns(seconds, name)


@dataclass(frozen=True, init=False)
class RuleSpec:
    """One rate-limit rule: a bucket per (rule, client, resource) it matches,
    holding ``burst`` tokens (default ``limit``) and refilling ``limit``
    tokens per ``window``.

    ``client`` and ``resource`` are patterns: exact, ``prefix*`` or ``*``.
    ``window`` and ``expire_idle`` take seconds or a timedelta (or exact
    ``window_ns`` / ``expire_idle_ns``). ``on_failure``, ``accuracy`` and
    ``fallback_limit`` apply to ``scope="global"`` rules only.

    >>> RuleSpec("api", "*", "api/*", limit=100, window=60, burst=20).window
    60.0
    """

    id: str
    client: str
    resource: str
    limit: int
    window_ns: int
    burst: Optional[int] = None
    expire_idle_ns: Optional[int] = None
    reserve: Reserve = field(default_factory=Reserve)
    scope: Scope = Scope.LOCAL
    on_failure: Optional[OnFailure] = None
    accuracy: Optional[Accuracy] = None
    fallback_limit: Optional[int] = None
    per: Per = Per.CLIENT_RESOURCE
    shadow: bool = False

    def __init__(
        self,
        id: str,
        client: str,
        resource: str,
        limit: int,
        window: Optional[Duration] = None,
        *,
        burst: Optional[int] = None,
        expire_idle: Optional[Duration] = None,
        reserve: Optional[Reserve] = None,
        scope: Union[Scope, str] = Scope.LOCAL,
        on_failure: Union[OnFailure, str, None] = None,
        accuracy: Optional[Accuracy] = None,
        fallback_limit: Optional[int] = None,
        window_ns: Optional[int] = None,
        expire_idle_ns: Optional[int] = None,
        per: Union[Per, str] = Per.CLIENT_RESOURCE,
        shadow: bool = False,
    ) -> None:
        if expire_idle is not None and expire_idle_ns is not None:
            raise TypeError("give at most one of expire_idle (seconds) and expire_idle_ns")
        if expire_idle is not None:
            expire_idle_ns = duration_ns(expire_idle, "expire_idle")
        values = {
            "id": id,
            "client": client,
            "resource": resource,
            "limit": limit,
            "window_ns": _one_duration("window", window, window_ns),
            "burst": burst,
            "expire_idle_ns": expire_idle_ns,
            "reserve": Reserve() if reserve is None else reserve,
            "scope": Scope.parse(scope),
            "on_failure": None if on_failure is None else OnFailure.parse(on_failure),
            "accuracy": accuracy,
            "fallback_limit": fallback_limit,
            "per": Per.parse(per),
            "shadow": bool(shadow),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def window(self) -> float:
        """The refill period of ``limit``, in seconds."""
        return self.window_ns / NANOS_PER_SECOND

    @property
    def expire_idle(self) -> Optional[float]:
        """Seconds without a matching request after which the rule is removed."""
        return _seconds(self.expire_idle_ns)


@dataclass(frozen=True)
class RuleExplained:
    """One rule an ``explain`` found matching (protocol version 3)."""

    id: str
    per: Per
    shadow: bool
    scope: Scope
    overridden_by: Optional[str]
    """The more specific rule with the same ``per`` that applies instead."""
    client: str
    """The bucket's names: empty where the rule is not keyed by one."""
    resource: str
    tokens: int
    depth: int
    outcome: Optional["Outcome"]
    """What the rule would decide; ``None`` when overridden."""
    retry_after_ns: int
    cost_too_high: bool


@dataclass(frozen=True)
class Explanation:
    """What an acquire would meet now; nothing was spent."""

    decision: "Decision"
    rules: List[RuleExplained]


@dataclass(frozen=True)
class LeaseInfo:
    """How a global rule leases tokens on this daemon."""

    batch: int
    per_request: bool
    members: int
    bound: float
    """Promised over-admission bound, in tokens."""
    allowed_error: float
    held: int


@dataclass(frozen=True)
class RuleInfo:
    """A rule with its live counters."""

    spec: RuleSpec
    source: RuleSource
    allowed: int
    rejected: int
    bypassed: int
    idle_ns: int
    lease: Optional[LeaseInfo] = None

    @property
    def idle(self) -> float:
        """Seconds since a request last matched the rule."""
        return self.idle_ns / NANOS_PER_SECOND


@dataclass(frozen=True)
class LatencySummary:
    """Decision latency inside the daemon, nanoseconds (sampled)."""

    count: int
    avg_ns: int
    p50_ns: int
    p90_ns: int
    p99_ns: int
    p999_ns: int
    max_ns: int


@dataclass(frozen=True)
class RuleCounters:
    """Decisions of one rule."""

    id: str
    allowed: int
    rejected: int
    bypassed: int


@dataclass(frozen=True)
class PeerClock:
    """One peer's clock as this daemon measures it."""

    node: str
    offset_ns: int
    samples: int


@dataclass(frozen=True)
class ClockReport:
    """This daemon's wall clock against its peers' (etcd mode)."""

    offset_ns: int
    max_skew_ns: int
    skewed: bool
    transitions: int
    delay_ns: int
    peers: List[PeerClock]


@dataclass(frozen=True)
class GlobalRuleStats:
    """One global rule's lease state."""

    id: str
    lease: LeaseInfo


@dataclass(frozen=True)
class ShareStats:
    """This daemon's shares of global rules (v2 leases)."""

    count: int
    """Operating count n: implicit shares are 1/n (0: none in force yet)."""
    valid_for_ns: int
    """Nanoseconds until the shares lapse unless renewed (0: lapsed)."""
    recorded: int
    records_created: int
    records_deleted: int
    raises: int
    lowers: int
    count_changes: int
    etcd_db_bytes: int
    etcd_nospace: bool


@dataclass(frozen=True)
class ClusterStats:
    """Coordination through etcd."""

    state: str
    state_changes: int
    members: int
    lease_txns: int
    lease_conflicts: int
    lease_failures: int
    tokens_leased: int
    tokens_returned: int
    debt_charged: int
    dropped_events: int
    txn_latency: LatencySummary
    rules: List[GlobalRuleStats]
    clock: ClockReport
    lease_ops: int
    lease_unknown: int
    lease_resolved: int
    lease_repairs: int
    lease_clamped: int
    bucket_cap_refusals: int
    shares: Optional[ShareStats] = None
    """``None`` from a daemon older than v2 leases."""


@dataclass(frozen=True)
class StatsReport:
    """Counters, gauges and latency of the daemon."""

    uptime_ns: int
    allowed: int
    rejected: int
    bypassed: int
    unmatched: int
    """Requests no rule matched, answered by the default action."""
    buckets: int
    max_buckets: int
    evicted_idle: int
    evicted_lru: int
    rules: int
    rules_expired: int
    connections_open: int
    connections_total: int
    connections_rejected: int
    protocol_errors: int
    latency: LatencySummary
    per_rule: List[RuleCounters]
    cluster: Optional[ClusterStats] = None

    @property
    def uptime(self) -> float:
        """Seconds since the daemon started."""
        return self.uptime_ns / NANOS_PER_SECOND


@dataclass(frozen=True)
class EtcdHealth:
    """The etcd cluster as this daemon sees it."""

    state: str
    since_unix_ms: int
    members: int
    node_id: str
    last_error: str
    clock: ClockReport


@dataclass(frozen=True)
class HealthReport:
    """Whether the daemon is serving and how it coordinates."""

    state: ServingState
    version: str
    uptime_ns: int
    rules: int
    mode: str
    """``standalone``, or ``etcd`` when limits are shared."""
    etcd: Optional[EtcdHealth] = None

    @property
    def uptime(self) -> float:
        """Seconds since the daemon started."""
        return self.uptime_ns / NANOS_PER_SECOND
