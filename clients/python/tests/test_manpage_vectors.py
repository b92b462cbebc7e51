"""The TEST VECTORS of man/rld-protocol.7, read from the page at test time:
every vector is decoded to the message it documents and that message is
encoded back to the page's bytes, so a change to the page or the codec that
makes them disagree fails here."""

from __future__ import annotations

import re
from typing import Dict, List, NamedTuple

import pytest

from rld import (
    Acquire,
    Decision,
    HealthReport,
    Outcome,
    Priority,
    RuleSpec,
    ServerInfo,
    ServingState,
    TraceContext,
    wire,
)
from rld.messages import (
    Accuracy,
    Explanation,
    Per,
    RuleExplained,
    ClockReport,
    ClusterStats,
    ShareStats,
    ErrorBody,
    EtcdHealth,
    GlobalRuleStats,
    LatencySummary,
    LeaseInfo,
    PeerClock,
    Reserve,
    RuleCounters,
    RuleInfo,
    RuleSource,
    StatsReport,
    VersionRange,
    Welcome,
)
from rld.wire import Frame
from support import MAN_PAGE

_MARKER = re.compile(r'^\.\\" test-vector: (\S+)\s*$')
# Hex bytes, then (after at least two spaces) the annotation.
_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]{2}(?: [0-9a-fA-F]{2})*)(?:\s{2,}(?P<note>.*))?$")


class Vector(NamedTuple):
    name: str
    title: str
    data: bytes
    notes: List[str]

    @property
    def direction(self) -> str:
        """``Request`` or ``Response``, from the ``Request::X`` annotation."""
        found = {m.group(1) for n in self.notes for m in re.finditer(r"\b(Request|Response)::", n)}
        assert len(found) == 1, f"vector {self.name}: cannot tell request from response: {self.notes}"
        return found.pop()


def page_vectors(text: str) -> Dict[str, Vector]:
    """``name -> Vector`` for each ``.\\" test-vector: NAME`` block: its
    ``.SS`` title and the bytes of its ``.EX``/``.EE`` example."""
    vectors: Dict[str, Vector] = {}
    lines = iter(text.splitlines())
    for line in lines:
        marker = _MARKER.match(line)
        if not marker:
            continue
        name = marker.group(1)
        assert name not in vectors, f"vector {name} appears twice in the page"
        title, data, notes, in_example = "", bytearray(), [], False
        for line in lines:
            if line.startswith(".SS ") and not in_example:
                title = line[4:].strip('"')
            elif line == ".EX":
                in_example = True
            elif line == ".EE":
                break
            elif in_example:
                m = _LINE.match(line)
                assert m, f"vector {name}: line {line!r} is not hex bytes and an annotation"
                data += bytes.fromhex(m.group("hex"))
                notes.append(m.group("note") or "")
        else:
            raise AssertionError(f"vector {name}: no .EE before the end of the page")
        assert data, f"vector {name} has no bytes"
        vectors[name] = Vector(name, title, bytes(data), notes)
    return vectors


VECTORS = page_vectors(MAN_PAGE.read_text(encoding="utf-8"))

_TRACE = TraceContext.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
_LEASE = LeaseInfo(batch=12, per_request=False, members=3, bound=46.5, allowed_error=0.02, held=7)
_CLOCK = ClockReport(
    offset_ns=-1500,
    max_skew_ns=10_000_000,
    skewed=False,
    transitions=0,
    delay_ns=200_000,
    peers=[PeerClock("web-2", 3000, 12)],
)
_LATENCY = LatencySummary(8, 5000, 4096, 8192, 16384, 16384, 20000)
_GLOBAL_RULE = RuleSpec(
    "search",
    "*",
    "api/search",
    limit=1000,
    window=1,
    burst=100,
    expire_idle=3600,
    reserve=Reserve(high=50, normal=100, low=200),
    scope="global",
    on_failure="local",
    accuracy=Accuracy(error_bp=200, horizon_ns=10_000_000_000),
    fallback_limit=400,
)

_EACH_V3 = RuleSpec("each", "*", "api/*", limit=100, window=60, per="client", shadow=True)

# What each vector documents, written from its title and annotations.
EXPECTED: Dict[str, Frame] = {
    "hello": Frame(1, "Hello", 1),
    "hello-v2": Frame(1, "Hello", 2),
    "welcome": Frame(1, "Welcome", Welcome(2, 1, 2, "rld", 65536, ["acquire-many", "priorities"])),
    "unsupported-version": Frame(1, "UnsupportedVersion", VersionRange(3, 1, 2)),
    "hello-ok": Frame(1, "HelloOk", ServerInfo(version=1, server="rld", max_frame=65536)),
    "acquire": Frame(2, "Acquire", Acquire("alice", "api/search")),
    "acquire-trace": Frame(300, "Acquire", Acquire("bob", "db", 5, Priority.CRITICAL, _TRACE)),
    "decision-allowed": Frame(2, "Decision", Decision(Outcome.ALLOWED, 100, 99, 0, 600_000_000, "api")),
    "decision-denied": Frame(
        3, "Decision", Decision(Outcome.DENIED, 100, 0, 250_000_000, 60_000_000_000, "api")
    ),
    "acquire-many": Frame(4, "AcquireMany", [Acquire("a", "x"), Acquire("b", "x", 2, Priority.LOW)]),
    "decisions": Frame(
        4,
        "Decisions",
        [Decision(Outcome.ALLOWED, 10, 9, 0, 100_000_000, "r"), ErrorBody(6, "too big")],
    ),
    "error": Frame(0, "Error", ErrorBody(1, "frame too large")),
    "rule-set": Frame(5, "RuleSet", [RuleSpec("api", "*", "api/*", limit=100, window=60, burst=150)]),
    "rules-applied": Frame(5, "RulesApplied", 1),
    "rule-get": Frame(6, "RuleGet", "api"),
    "rule-list": Frame(7, "RuleList"),
    "rule-delete": Frame(8, "RuleDelete", "api"),
    "rule-deleted": Frame(8, "RuleDeleted"),
    "stats": Frame(9, "Stats"),
    "health": Frame(10, "Health"),
    "health-report": Frame(
        10, "Health", HealthReport(ServingState.OK, "0.1.0", 1_000_000_000, 2, "standalone", None)
    ),
    "decision-bypassed": Frame(
        11, "Decision", Decision(Outcome.BYPASSED, 100, 0, 0, 120_000_000_000, "api")
    ),
    "error-with-id": Frame(6, "Error", ErrorBody(8, 'no rule "api"')),
    "rule-info": Frame(
        12, "Rule", RuleInfo(_GLOBAL_RULE, RuleSource.ETCD, 5, 1, 0, 2_000_000_000, _LEASE)
    ),
    "stats-report": Frame(
        9,
        "Stats",
        StatsReport(
            60_000_000_000, 5, 1, 0, 2, 3, 1_000_000, 0, 0, 1, 0, 1, 4, 0, 0,
            _LATENCY,
            [RuleCounters("search", 5, 1, 0)],
            ClusterStats(
                "healthy", 0, 3, 10, 1, 0, 120, 5, 0, 0,
                _LATENCY,
                [GlobalRuleStats("search", _LEASE)],
                _CLOCK,
                10, 0, 0, 0, 0, 0,
                ShareStats(3, 9_000_000_000, 1, 1, 0, 2, 1, 2, 1_048_576, False),
            ),
        ),
    ),
    "hello-v3": Frame(1, "Hello", 3),
    "rule-set-v3": Frame(13, "RuleSetV3", [_EACH_V3]),
    "rule-get-v3": Frame(14, "RuleGetV3", "each"),
    "rule-list-v3": Frame(15, "RuleListV3"),
    "rule-v3": Frame(14, "RuleV3", RuleInfo(_EACH_V3, RuleSource.RUNTIME, 3, 1, 0, 0, None)),
    "explain": Frame(16, "Explain", Acquire("alice", "api/x")),
    "explanation": Frame(
        16,
        "Explanation",
        Explanation(
            Decision(Outcome.ALLOWED, 10, 9, 0, 6_000_000_000, "total"),
            [
                RuleExplained(
                    "total", Per.NONE, False, "local", None, "", "", 10, 10, Outcome.ALLOWED, 0, False
                )
            ],
        ),
    ),
    "health-etcd": Frame(
        10,
        "Health",
        HealthReport(
            ServingState.OK,
            "0.1.0",
            60_000_000_000,
            1,
            "etcd",
            EtcdHealth("healthy", 1_764_460_800_000, 3, "web-1", "", _CLOCK),
        ),
    ),
}


def test_the_page_has_vectors_and_each_has_an_expectation():
    assert len(VECTORS) >= 18, f"only {len(VECTORS)} vectors found in {MAN_PAGE}"
    assert sorted(VECTORS) == sorted(EXPECTED), (
        "vectors in the page and expectations here differ: "
        f"only in page {sorted(set(VECTORS) - set(EXPECTED))}, "
        f"only here {sorted(set(EXPECTED) - set(VECTORS))}"
    )


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector(name: str):
    vector = VECTORS[name]
    data = vector.data
    assert wire.frame_length(data) == len(data) - wire.HEADER_LEN, f"{name}: length prefix"
    announced = re.match(r"frame length (\d+)$", vector.notes[0])
    assert announced and int(announced.group(1)) == len(data) - 4, f"{name}: {vector.notes[0]!r}"

    expected = EXPECTED[name]
    if vector.direction == "Request":
        assert wire.decode_request(data[4:]) == expected, f"decoding {name}"
        assert wire.encode_request(expected) == data, f"encoding {name}"
    else:
        assert wire.decode_response(data[4:]) == expected, f"decoding {name}"
        assert wire.encode_response(expected) == data, f"encoding {name}"


def test_the_parser_rejects_a_line_that_is_not_hex():
    page = '.\\" test-vector: x\n.SS "X"\n.EX\n00 00 00 01   frame length 1\nzz   oops\n.EE\n'
    with pytest.raises(AssertionError, match="not hex bytes"):
        page_vectors(page)
