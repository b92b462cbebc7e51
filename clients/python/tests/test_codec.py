"""The encoding on its own: varint edges, every message round trip, and
malformed input failing with a clear :class:`rld.MalformedFrame`."""

from __future__ import annotations

import dataclasses
import datetime
import math

import pytest

import rld
from rld import postcard, wire
from rld.messages import ErrorBody
from rld.postcard import DecodeError, Reader
from rld.wire import Frame


def encode(spec: postcard.Spec, value) -> bytes:
    out = bytearray()
    spec.encode(out, value)
    return bytes(out)


def decode(spec: postcard.Spec, data: bytes):
    r = Reader(data)
    value = spec.decode(r)
    assert r.pos == len(data), "bytes left over"
    return value


@pytest.mark.parametrize(
    "spec,value,hex",
    [
        (wire.U64, 0, "00"),
        (wire.U64, 1, "01"),
        (wire.U64, 127, "7f"),
        (wire.U64, 128, "8001"),
        (wire.U64, 300, "ac02"),
        (wire.U64, 16383, "ff7f"),
        (wire.U64, 16384, "808001"),
        (wire.U64, 65536, "808004"),
        (wire.U16, 65535, "ffff03"),
        (wire.U32, 2**32 - 1, "ffffffff0f"),
        (wire.U64, 2**63, "80808080808080808001"),
        (wire.U64, 2**64 - 1, "ffffffffffffffffff01"),
        (wire.I64, 0, "00"),
        (wire.I64, -1, "01"),
        (wire.I64, 1, "02"),
        (wire.I64, -64, "7f"),
        (wire.I64, 64, "8001"),
        (wire.I64, 2**63 - 1, "feffffffffffffffff01"),
        (wire.I64, -(2**63), "ffffffffffffffffff01"),
        (wire.U8, 255, "ff"),
        (wire.BOOL, True, "01"),
        (wire.F64, 1.5, "000000000000f83f"),
        (wire.STR, "", "00"),
        (wire.STR, "é", "02c3a9"),
    ],
)
def test_primitives_encode_and_decode(spec, value, hex):
    assert encode(spec, value).hex() == hex
    assert decode(spec, bytes.fromhex(hex)) == value


def test_non_minimal_varints_are_accepted_like_postcard_does():
    assert decode(wire.U64, bytes.fromhex("8000")) == 0
    assert decode(wire.U16, bytes.fromhex("ff8000")) == 127


@pytest.mark.parametrize(
    "spec,hex,problem",
    [
        (wire.U16, "808004", "overflows u16"),
        (wire.U16, "80808000", "longer than 3 bytes"),
        (wire.U32, "ffffffff1f", "overflows u32"),
        (wire.U64, "ffffffffffffffffff02", "overflows u64"),
        (wire.U64, "8080808080808080808000", "longer than 10 bytes"),
        (wire.U64, "80", "unexpected end"),
        (wire.U64, "", "unexpected end"),
        (wire.BOOL, "02", "not 00 or 01"),
        (wire.STR, "03 61 62", "3 bytes needed, 2 left"),
        (wire.STR, "02 c3 28", "not UTF-8"),
        (wire.F64, "00 00 00", "8 bytes needed"),
    ],
)
def test_malformed_primitives_raise(spec, hex, problem):
    with pytest.raises(DecodeError, match=problem):
        decode(spec, bytes.fromhex(hex))


@pytest.mark.parametrize(
    "spec,value,error",
    [
        (wire.U64, -1, ValueError),
        (wire.U64, 2**64, ValueError),
        (wire.U16, 65536, ValueError),
        (wire.U32, 2**32, ValueError),
        (wire.I64, 2**63, ValueError),
        (wire.U64, True, TypeError),
        (wire.U64, 1.0, TypeError),
        (wire.U8, 256, ValueError),
        (wire.STR, b"bytes", TypeError),
        (wire.STR, "\ud800", UnicodeEncodeError),
        (wire.BOOL, 1, TypeError),
        (wire.F64, "1", TypeError),
    ],
)
def test_values_that_do_not_fit_are_refused(spec, value, error):
    with pytest.raises(error):
        encode(spec, value)


TRACE = rld.TraceContext(bytes(range(1, 17)), bytes(range(1, 9)), 0)
RULE = rld.RuleSpec(
    "search",
    "team-*",
    "api/search",
    limit=1000,
    window=datetime.timedelta(seconds=1),
    burst=100,
    expire_idle=3600,
    reserve=rld.Reserve(high=0, normal=100, low=300),
    scope="global",
    on_failure="local",
    accuracy=rld.Accuracy(200, 10),
    fallback_limit=400,
)
LEASE = rld.LeaseInfo(batch=12, per_request=False, members=3, bound=36.5, allowed_error=200.0, held=7)
LATENCY = rld.LatencySummary(9, 1100, 1000, 2000, 2300, 2300, 2300)
CLOCK = rld.ClockReport(
    offset_ns=-1500,
    max_skew_ns=10_000_000,
    skewed=True,
    transitions=2,
    delay_ns=900,
    peers=[rld.PeerClock("web-2", -(2**63), 5), rld.PeerClock("web-3", 2**63 - 1, 4)],
)
CLUSTER = rld.ClusterStats(
    "healthy", 1, 3, 10, 1, 0, 500, 20, 3, 0, LATENCY,
    [rld.GlobalRuleStats("search", LEASE)], CLOCK, 11, 1, 1, 0, 0, 2**64 - 1,
    rld.ShareStats(3, 9_000_000_000, 1, 2, 1, 4, 3, 2, 2**40, True),
)
STATS = rld.StatsReport(
    5_000_000_000, 10, 2, 1, 4, 3, 1_000_000, 0, 0, 2, 0, 1, 6, 0, 0, LATENCY,
    [rld.RuleCounters("search", 10, 2, 1)], CLUSTER,
)
HEALTH = rld.HealthReport(
    rld.ServingState.DEGRADED, "0.1.0", 42, 2, "etcd",
    rld.EtcdHealth("suspect", 1_700_000_000_000, 3, "web-1", "timeout", CLOCK),
)
INFO = rld.RuleInfo(RULE, rld.RuleSource.ETCD, 1, 2, 3, 4, LEASE)

REQUESTS = [
    Frame(1, "Hello", 65535),
    Frame(2, "Acquire", rld.Acquire("ü", "r" * 600, 0, "high", TRACE)),
    Frame(3, "AcquireMany", []),
    Frame(4, "AcquireMany", [rld.Acquire("a", "x"), rld.Acquire("b", "y", 2**64 - 1, "critical")]),
    Frame(5, "RuleSet", [RULE, rld.RuleSpec("a", "*", "*", limit=1, window_ns=1)]),
    Frame(6, "RuleGet", "search"),
    Frame(7, "RuleList"),
    Frame(8, "RuleDelete", "search"),
    Frame(9, "Stats"),
    Frame(2**64 - 1, "Health"),
    Frame(10, "RuleSetV3", [RULE, rld.RuleSpec("t", "*", "*", limit=1, window=1, per="none", shadow=True)]),
    Frame(11, "RuleGetV3", "search"),
    Frame(12, "RuleListV3"),
    Frame(13, "Explain", rld.Acquire("a", "x", 3, "low")),
]
RESPONSES = [
    Frame(1, "HelloOk", rld.ServerInfo(1, "rld 0.1.0", 2**32 - 1)),
    Frame(1, "Welcome", rld.messages.Welcome(2, 1, 2, "rld 0.1.0", 65536, ["acquire-many"])),
    Frame(1, "UnsupportedVersion", rld.messages.VersionRange(7, 1, 2)),
    Frame(2, "Decision", rld.Decision(rld.Outcome.BYPASSED, 1, 0, 0, 5, "")),
    Frame(
        3,
        "Decisions",
        [ErrorBody(65535, "newer code"), rld.Decision(rld.Outcome.DENIED, 1, 0, 9, 9, "r")],
    ),
    Frame(4, "RulesApplied", 0),
    Frame(5, "Rule", INFO),
    Frame(
        6,
        "Rules",
        [INFO, rld.RuleInfo(rld.RuleSpec("c", "c", "c", limit=2, window=0.25), "config", 0, 0, 0, 0)],
    ),
    Frame(7, "RuleDeleted"),
    Frame(8, "Stats", STATS),
    Frame(9, "Stats", dataclasses.replace(STATS, per_rule=[], cluster=None)),
    Frame(10, "Health", HEALTH),
    Frame(11, "Error", ErrorBody(7, 'rule "x": window is 0s')),
    Frame(12, "RuleV3", dataclasses.replace(INFO, spec=rld.RuleSpec("p", "*", "*", limit=1, window=1, per="resource"))),
    Frame(13, "RulesV3", [INFO]),
    Frame(
        14,
        "Explanation",
        rld.Explanation(
            rld.Decision(rld.Outcome.DENIED, 5, 0, 7, 9, "each"),
            [
                rld.RuleExplained("vip", "client", False, "global", None, "vip", "", 1, 5, rld.Outcome.DENIED, 7, False),
                rld.RuleExplained("each", "client", False, "local", "vip", "vip", "", 2, 2, None, 0, False),
            ],
        ),
    ),
]


@pytest.mark.parametrize("frame", REQUESTS, ids=lambda f: f.kind)
def test_requests_round_trip(frame):
    data = wire.encode_request(frame)
    assert wire.frame_length(data) == len(data) - 4
    assert wire.decode_request(data[4:]) == frame


@pytest.mark.parametrize("frame", RESPONSES, ids=lambda f: f.kind)
def test_responses_round_trip(frame):
    data = wire.encode_response(frame)
    assert wire.decode_response(data[4:]) == frame


def test_every_request_and_response_variant_is_exercised():
    assert {f.kind for f in REQUESTS} == {kind for kind, _ in wire.REQUEST.variants}
    assert {f.kind for f in RESPONSES} == {kind for kind, _ in wire.RESPONSE.variants}


def test_the_layouts_name_every_dataclass_field_in_declaration_order():
    # The wire order is declared in rld/wire.py; the dataclasses must agree
    # with it (both follow message.rs), or encoding would read wrong fields.
    # An older version's layout (RuleSpec of versions 1 and 2) names a prefix
    # of the fields, the rest having defaults; the newest names them all.
    seen = set()
    longest = {}

    def check(spec):
        if id(spec) in seen:
            return
        seen.add(id(spec))
        if isinstance(spec, postcard.Struct):
            fields = dataclasses.fields(spec.cls)
            names = [f.name for f in fields]
            layout = [n for n, _ in spec.fields]
            assert names[: len(layout)] == layout, spec.cls.__name__
            assert all(
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                for f in fields[len(layout) :]
            ), spec.cls.__name__
            longest[spec.cls] = max(longest.get(spec.cls, 0), len(layout))
            for _, inner in spec.fields:
                check(inner)
        elif isinstance(spec, (postcard.Opt, postcard.Seq)):
            check(spec.inner)
        elif isinstance(spec, postcard.Tagged):
            for _, inner in spec.variants:
                if inner is not None:
                    check(inner)

    check(wire.REQUEST)
    check(wire.RESPONSE)
    check(wire.DECISION)
    check(wire.ERROR)
    for cls, n in longest.items():
        assert n == len(dataclasses.fields(cls)), f"no layout names every field of {cls.__name__}"
    assert len(seen) > 20


def test_nan_and_infinities_survive():
    lease = dataclasses.replace(LEASE, bound=math.inf, allowed_error=math.nan)
    data = encode(wire.LEASE, lease)
    back = decode(wire.LEASE, data)
    assert back.bound == math.inf and math.isnan(back.allowed_error)


@pytest.mark.parametrize(
    "hex,where",
    [
        ("", "reading id"),
        ("01", "reading Response"),
        ("01 0f", "unknown Response variant 15"),
        ("01 01 03", "unknown Outcome variant 3"),
        ("01 01 00 64 63 00 00 03 61 70", "reading Response.Decision.rule"),
        ("01 01 00 64 63 00 00 00 ff", "1 unexpected bytes after the response"),
        ("01 02 05 00", "sequence of 5 items in 1 bytes"),
        ("01 02 01 02", "unknown BatchItem variant 2"),
        ("01 08 00 00 00 00 00 02", "Option tag byte is 0x02"),
        ("01 ff ff ff ff 1f", "varint overflows u32"),
    ],
)
def test_malformed_responses_say_where(hex, where):
    with pytest.raises(DecodeError, match=where) as info:
        wire.decode_response(bytes.fromhex(hex))
    assert isinstance(info.value, rld.MalformedFrame)
    assert info.value.code is None, "raised by this client, not sent by the daemon"


def test_malformed_requests_raise():
    with pytest.raises(DecodeError, match="unknown Request variant 13"):
        wire.decode_request(bytes.fromhex("01 0d"))
    with pytest.raises(DecodeError, match="unexpected bytes after the request"):
        wire.decode_request(bytes.fromhex("07 07 00"))


def test_encoding_errors_name_the_field():
    with pytest.raises(ValueError, match=r"Acquire\.cost: u64 must be in"):
        wire.request_body("Acquire", rld.Acquire("a", "b", -1))
    with pytest.raises(ValueError, match=r"RuleSpec\.reserve: Reserve\.low: u16"):
        wire.request_body("RuleSet", [dataclasses.replace(RULE, reserve=rld.Reserve(low=70000))])
    with pytest.raises(ValueError, match="unknown Request"):
        wire.request_body("Nope")
    with pytest.raises(ValueError, match="carries no value"):
        wire.request_body("Stats", 1)


def test_traceparents():
    text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    trace = rld.TraceContext.parse(text)
    assert str(trace) == text and trace.flags == 1 and len(trace.trace_id) == 16
    assert rld.Acquire("a", "b", trace=text).trace == trace
    for bad in [
        "",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    ]:
        with pytest.raises(ValueError, match="not a W3C traceparent"):
            rld.TraceContext.parse(bad)


def test_durations_are_seconds_and_kept_exact_in_nanoseconds():
    rule = rld.RuleSpec("r", "*", "*", limit=1, window=datetime.timedelta(minutes=1, microseconds=1))
    assert rule.window_ns == 60_000_001_000 and rule.window == 60.000001
    assert rld.RuleSpec("r", "*", "*", limit=1, window=0.25).window_ns == 250_000_000
    assert rld.RuleSpec("r", "*", "*", limit=1, window=2, expire_idle=1.5).expire_idle == 1.5
    assert rld.Accuracy(50, horizon=datetime.timedelta(seconds=10)).horizon == 10.0
    d = rld.Decision(rld.Outcome.DENIED, 10, 0, 250_000_000, 1_500_000_000, "r")
    assert (d.allowed, d.retry_after, d.reset_after) == (False, 0.25, 1.5)
    assert rld.Decision(rld.Outcome.BYPASSED, 1, 0, 0, 0, "r").allowed
    with pytest.raises(ValueError, match="negative"):
        rld.RuleSpec("r", "*", "*", limit=1, window=-1)
    with pytest.raises(TypeError, match="exactly one of window"):
        rld.RuleSpec("r", "*", "*", limit=1)
    with pytest.raises(TypeError, match="seconds"):
        rld.RuleSpec("r", "*", "*", limit=1, window="1m")


def test_rule_specs_are_values():
    again = dataclasses.replace(RULE)
    assert again == RULE and again is not RULE
    assert dataclasses.replace(RULE, burst=5).burst == 5
    assert RULE.scope is rld.Scope.GLOBAL and RULE.on_failure is rld.OnFailure.LOCAL


def test_enums_parse_their_names_only():
    assert rld.Priority.parse("critical") is rld.Priority.CRITICAL
    assert str(rld.Priority.LOW) == "low"
    with pytest.raises(ValueError, match="use one of low, normal, high, critical"):
        rld.Acquire("a", "b", priority="urgent")
