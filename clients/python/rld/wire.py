"""Protocol v1 on the wire: frames and the postcard encoding of every message.

A frame is a 4-byte big-endian length, then that many bytes of postcard
(:mod:`rld.postcard`): the request id (u64), then one ``Request`` (or, from
the daemon, the same id and one ``Response``). The layouts below follow
``src/protocol/message.rs`` and ``src/rule/mod.rs`` field for field; that
order is the wire order.

Messages are ``(id, kind, value)`` :class:`Frame` tuples: ``kind`` is the
variant name of rld-protocol(7) (``"Acquire"``, ``"HelloOk"``...) and
``value`` its payload (``None`` for variants without fields, the field itself
for one-field variants). No sockets here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import messages as m
from .postcard import (
    BOOL,
    F64,
    I64,
    STR,
    U8,
    U16,
    U32,
    U64,
    Enum,
    Fixed,
    Opt,
    Reader,
    Seq,
    Spec,
    Struct,
    Tagged,
)

PROTOCOL_VERSION = 3
"""The newest protocol version this client speaks (it greets older daemons
with the newest version they speak)."""
HEADER_LEN = 4
"""Bytes of a frame's length prefix."""
DEFAULT_MAX_FRAME = 65536
"""Largest request frame before the daemon says otherwise in HelloOk."""
MAX_RESPONSE_FRAME = 16 * 1024 * 1024
"""Largest response frame accepted."""


class Frame(NamedTuple):
    """One message: the request id (echoed by its answer), the variant name and
    its payload."""

    id: int
    kind: str
    value: Any = None


TRACE = Struct(m.TraceContext, [("trace_id", Fixed(16)), ("span_id", Fixed(8)), ("flags", U8)])
ACQUIRE = Struct(
    m.Acquire,
    [
        ("client", STR),
        ("resource", STR),
        ("cost", U64),
        ("priority", Enum(m.Priority)),
        ("trace", Opt(TRACE)),
    ],
)
RULE_SPEC = Struct(
    m.RuleSpec,
    [
        ("id", STR),
        ("client", STR),
        ("resource", STR),
        ("limit", U64),
        ("window_ns", U64),
        ("burst", Opt(U64)),
        ("expire_idle_ns", Opt(U64)),
        ("reserve", Struct(m.Reserve, [("high", U16), ("normal", U16), ("low", U16)])),
        ("scope", Enum(m.Scope)),
        ("on_failure", Opt(Enum(m.OnFailure))),
        ("accuracy", Opt(Struct(m.Accuracy, [("error_bp", U32), ("horizon_ns", U64)]))),
        ("fallback_limit", Opt(U64)),
    ],
)
RULE_SPEC_V3 = Struct(
    m.RuleSpec,
    list(RULE_SPEC.fields) + [("per", Enum(m.Per)), ("shadow", BOOL)],
)
"""A rule as protocol version 3 carries it: with ``per`` and ``shadow``."""
DECISION = Struct(
    m.Decision,
    [
        ("outcome", Enum(m.Outcome)),
        ("limit", U64),
        ("remaining", U64),
        ("retry_after_ns", U64),
        ("reset_after_ns", U64),
        ("rule", STR),
    ],
)
ERROR = Struct(m.ErrorBody, [("code", U16), ("message", STR)])
LEASE = Struct(
    m.LeaseInfo,
    [
        ("batch", U64),
        ("per_request", BOOL),
        ("members", U64),
        ("bound", F64),
        ("allowed_error", F64),
        ("held", U64),
    ],
)
RULE_INFO = Struct(
    m.RuleInfo,
    [
        ("spec", RULE_SPEC),
        ("source", Enum(m.RuleSource)),
        ("allowed", U64),
        ("rejected", U64),
        ("bypassed", U64),
        ("idle_ns", U64),
        ("lease", Opt(LEASE)),
    ],
)
RULE_INFO_V3 = Struct(
    m.RuleInfo, [("spec", RULE_SPEC_V3)] + [f for f in RULE_INFO.fields if f[0] != "spec"]
)
EXPLANATION = Struct(
    m.Explanation,
    [
        ("decision", DECISION),
        (
            "rules",
            Seq(
                Struct(
                    m.RuleExplained,
                    [
                        ("id", STR),
                        ("per", Enum(m.Per)),
                        ("shadow", BOOL),
                        ("scope", Enum(m.Scope)),
                        ("overridden_by", Opt(STR)),
                        ("client", STR),
                        ("resource", STR),
                        ("tokens", U64),
                        ("depth", U64),
                        ("outcome", Opt(Enum(m.Outcome))),
                        ("retry_after_ns", U64),
                        ("cost_too_high", BOOL),
                    ],
                )
            ),
        ),
    ],
)
LATENCY = Struct(
    m.LatencySummary,
    [
        (name, U64)
        for name in ("count", "avg_ns", "p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns")
    ],
)
CLOCK = Struct(
    m.ClockReport,
    [
        ("offset_ns", I64),
        ("max_skew_ns", U64),
        ("skewed", BOOL),
        ("transitions", U64),
        ("delay_ns", U64),
        ("peers", Seq(Struct(m.PeerClock, [("node", STR), ("offset_ns", I64), ("samples", U32)]))),
    ],
)
CLUSTER = Struct(
    m.ClusterStats,
    [("state", STR)]
    + [
        (name, U64)
        for name in (
            "state_changes",
            "members",
            "lease_txns",
            "lease_conflicts",
            "lease_failures",
            "tokens_leased",
            "tokens_returned",
            "debt_charged",
            "dropped_events",
        )
    ]
    + [
        ("txn_latency", LATENCY),
        ("rules", Seq(Struct(m.GlobalRuleStats, [("id", STR), ("lease", LEASE)]))),
        ("clock", CLOCK),
    ]
    + [
        (name, U64)
        for name in (
            "lease_ops",
            "lease_unknown",
            "lease_resolved",
            "lease_repairs",
            "lease_clamped",
            "bucket_cap_refusals",
        )
    ]
    + [
        (
            "shares",
            Opt(
                Struct(
                    m.ShareStats,
                    [
                        (name, U64)
                        for name in (
                            "count",
                            "valid_for_ns",
                            "recorded",
                            "records_created",
                            "records_deleted",
                            "raises",
                            "lowers",
                            "count_changes",
                            "etcd_db_bytes",
                        )
                    ]
                    + [("etcd_nospace", BOOL)],
                )
            ),
        )
    ],
)
STATS = Struct(
    m.StatsReport,
    [
        (name, U64)
        for name in (
            "uptime_ns",
            "allowed",
            "rejected",
            "bypassed",
            "unmatched",
            "buckets",
            "max_buckets",
            "evicted_idle",
            "evicted_lru",
            "rules",
            "rules_expired",
            "connections_open",
            "connections_total",
            "connections_rejected",
            "protocol_errors",
        )
    ]
    + [
        ("latency", LATENCY),
        (
            "per_rule",
            Seq(
                Struct(
                    m.RuleCounters,
                    [("id", STR), ("allowed", U64), ("rejected", U64), ("bypassed", U64)],
                )
            ),
        ),
        ("cluster", Opt(CLUSTER)),
    ],
)
HEALTH = Struct(
    m.HealthReport,
    [
        ("state", Enum(m.ServingState)),
        ("version", STR),
        ("uptime_ns", U64),
        ("rules", U64),
        ("mode", STR),
        (
            "etcd",
            Opt(
                Struct(
                    m.EtcdHealth,
                    [
                        ("state", STR),
                        ("since_unix_ms", U64),
                        ("members", U64),
                        ("node_id", STR),
                        ("last_error", STR),
                        ("clock", CLOCK),
                    ],
                )
            ),
        ),
    ],
)


class _BatchItem(Spec):
    """``BatchItem``: 0 a Decision, 1 an ErrorBody; values are the objects."""

    def encode(self, out: bytearray, value: Any) -> None:
        if isinstance(value, m.ErrorBody):
            out.append(1)
            ERROR.encode(out, value)
        else:
            out.append(0)
            DECISION.encode(out, value)

    def decode(self, r: Reader) -> Any:
        return _BATCH_UNION.decode(r)[1]


_BATCH_UNION = Tagged("BatchItem", [("Decision", DECISION), ("Error", ERROR)])

REQUEST = Tagged(
    "Request",
    [
        ("Hello", U16),
        ("Acquire", ACQUIRE),
        ("AcquireMany", Seq(ACQUIRE)),
        ("RuleSet", Seq(RULE_SPEC)),
        ("RuleGet", STR),
        ("RuleList", None),
        ("RuleDelete", STR),
        ("Stats", None),
        ("Health", None),
        ("RuleSetV3", Seq(RULE_SPEC_V3)),
        ("RuleGetV3", STR),
        ("RuleListV3", None),
        ("Explain", ACQUIRE),
    ],
)
"""Request variants in wire order (``RequestFrame`` in message.rs)."""

RESPONSE = Tagged(
    "Response",
    [
        ("HelloOk", Struct(m.ServerInfo, [("version", U16), ("server", STR), ("max_frame", U32)])),
        ("Decision", DECISION),
        ("Decisions", Seq(_BatchItem())),
        ("RulesApplied", U32),
        ("Rule", RULE_INFO),
        ("Rules", Seq(RULE_INFO)),
        ("RuleDeleted", None),
        ("Stats", STATS),
        ("Health", HEALTH),
        ("Error", ERROR),
        (
            "Welcome",
            Struct(
                m.Welcome,
                [
                    ("version", U16),
                    ("min_version", U16),
                    ("max_version", U16),
                    ("server", STR),
                    ("max_frame", U32),
                    ("capabilities", Seq(STR)),
                ],
            ),
        ),
        (
            "UnsupportedVersion",
            Struct(m.VersionRange, [("requested", U16), ("min_version", U16), ("max_version", U16)]),
        ),
        ("RuleV3", RULE_INFO_V3),
        ("RulesV3", Seq(RULE_INFO_V3)),
        ("Explanation", EXPLANATION),
    ],
)
"""Response variants in wire order (``ResponseFrame`` in message.rs)."""


def _body(union: Tagged, kind: str, value: Any) -> bytes:
    out = bytearray()
    union.encode(out, (kind, value))
    return bytes(out)


def request_body(kind: str, value: Any = None) -> bytes:
    """The ``Request`` part of a frame (no header, no id), to be framed with
    :func:`frame` once an id is chosen.

    Raises:
        TypeError, ValueError: a value that does not fit its field (the
            message names the field).
    """
    return _body(REQUEST, kind, value)


def frame(id: int, body: bytes) -> bytes:
    """A whole frame: length prefix, ``id``, then ``body``."""
    out = bytearray(HEADER_LEN)
    U64.encode(out, id)
    out += body
    out[:HEADER_LEN] = (len(out) - HEADER_LEN).to_bytes(HEADER_LEN, "big")
    return bytes(out)


def _decode(union: Tagged, body: bytes) -> Frame:
    r = Reader(body)
    r.path.append("id")
    id = r.varint(64)
    r.path[-1] = union.name
    kind, value = union.decode(r)
    r.path.pop()
    if r.pos != len(body):
        raise r.fail(f"{len(body) - r.pos} unexpected bytes after the {union.name.lower()}")
    return Frame(id, kind, value)


def encode_request(msg: Frame) -> bytes:
    """A whole request frame (length prefix included).

    Raises:
        TypeError, ValueError: as :func:`request_body`.
    """
    return frame(msg.id, request_body(msg.kind, msg.value))


def encode_response(msg: Frame) -> bytes:
    """A whole response frame (what the daemon sends; for tests and fakes)."""
    return frame(msg.id, _body(RESPONSE, msg.kind, msg.value))


def decode_request(body: bytes) -> Frame:
    """A request from a frame body (length prefix excluded).

    Raises:
        DecodeError: not exactly one well-formed request.
    """
    return _decode(REQUEST, body)


def decode_response(body: bytes) -> Frame:
    """A response from a frame body (length prefix excluded).

    Raises:
        DecodeError: not exactly one well-formed response.
    """
    return _decode(RESPONSE, body)


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte frame header."""
    return int.from_bytes(header[:HEADER_LEN], "big")
