"""The client against a real rld: decisions, batches, pipelines, rules,
statistics, health, and the daemon's errors as typed exceptions."""

from __future__ import annotations

import os
import select
import socket
import threading
from typing import List

import pytest

import rld
from rld import wire
from rld.wire import Frame

API = rld.RuleSpec("api", "*", "api/*", limit=2, window=60)
CONFIG_RULE = """
[[rule]]
id = "from-config"
client = "*"
resource = "cfg/*"
limit = 10
window = "1m"
"""


def test_handshake_reports_the_server(client):
    info = client.connect()
    assert info == rld.ServerInfo(version=3, server="rld 0.1.0", max_frame=65536)
    assert client.server_info == info


def test_acquire_is_allowed_until_the_limit_then_denied_with_retry_after(client):
    assert client.set_rule(API) == 1
    first = client.acquire("alice", "api/search")
    second = client.acquire("alice", "api/search")
    assert (first.allowed, first.remaining, first.rule, first.limit) == (True, 1, "api", 2)
    assert (second.allowed, second.remaining) == (True, 0)
    denied = client.acquire("alice", "api/search")
    assert denied.outcome is rld.Outcome.DENIED and not denied.allowed
    # One token per 30 s: the next one is at most 30 s away.
    assert 29 < denied.retry_after <= 30
    assert 30 < denied.reset_after <= 60
    assert client.acquire("bob", "api/search").allowed, "one bucket per client"


def test_unmatched_requests_get_the_default_action(client):
    d = client.acquire("alice", "no-rule-here")
    assert d.allowed and d.rule == "" and d.limit == 0


def test_cost_priority_and_trace_reach_the_daemon(client):
    client.set_rule(rld.RuleSpec("api", "*", "api/*", limit=4, window=60, reserve=rld.Reserve(low=500)))
    probe = client.acquire("alice", "api/x", cost=0)
    assert probe.allowed and probe.remaining == 4, "cost 0 asks without spending"
    assert client.acquire("alice", "api/x", cost=2, priority="high").remaining == 2
    # low must leave half the bucket: 2 left, so one more low token is refused.
    assert not client.acquire("alice", "api/x", priority=rld.Priority.LOW).allowed
    assert client.acquire("alice", "api/x", cost=2).remaining == 0
    bypass = client.acquire(
        "alice", "api/x", priority="critical",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    assert bypass.outcome is rld.Outcome.BYPASSED and bypass.allowed


def test_acquire_errors_are_typed(client):
    client.set_rule(API)
    with pytest.raises(rld.CostExceedsBurst, match="cost 3 exceeds") as info:
        client.acquire("alice", "api/x", cost=3)
    assert info.value.code == 6 and isinstance(info.value, rld.InvalidRequest)
    with pytest.raises(rld.InvalidArgument, match="client is empty"):
        client.acquire("", "api/x")
    with pytest.raises(rld.InvalidArgument, match="the maximum is 512 bytes"):
        client.acquire("alice", "r" * 513)
    assert client.acquire("alice", "api/x").allowed, "the connection survives request errors"


def test_acquire_many_decides_each_item_in_order(client):
    client.set_rule(API)
    results = client.acquire_many(
        [
            ("alice", "api/x"),
            rld.Acquire("alice", "api/x"),
            {"client": "alice", "resource": "api/x"},
            ("alice", "api/x", 5),
            ("", "api/x"),
            ("carol", "api/x", 1, "low"),
        ]
    )
    assert [type(r) for r in results] == [
        rld.Decision, rld.Decision, rld.Decision, rld.CostExceedsBurst, rld.InvalidArgument, rld.Decision,
    ]
    assert [r.allowed for r in results if isinstance(r, rld.Decision)] == [True, True, False, True]
    assert client.acquire_many([]) == []


def test_a_pipeline_matches_every_answer_to_its_call(client):
    client.set_rule(API)
    results = (
        client.pipeline()
        .acquire("alice", "api/x")
        .health()
        .get_rule("missing")
        .acquire("alice", "api/x")
        .acquire("alice", "api/x")
        .stats()
        .list_rules()
        .execute(raise_on_error=False)
    )
    assert [type(r).__name__ for r in results] == [
        "Decision", "HealthReport", "RuleNotFound", "Decision", "Decision", "StatsReport", "list",
    ]
    assert [results[i].remaining for i in (0, 3)] == [1, 0] and not results[4].allowed
    assert results[5].allowed == 2 and results[5].rejected == 1
    with pytest.raises(rld.RuleNotFound):
        client.pipeline().stats().get_rule("missing").execute()
    assert client.pipeline().execute() == []


def test_a_pipeline_larger_than_the_socket_buffers_does_not_deadlock(client):
    n = 20_000
    with client.pipeline() as p:
        for i in range(n):
            p.acquire(f"client-{i}", "bulk")
        results = p.execute()
    assert len(results) == n and all(r.allowed for r in results)
    assert client.stats().unmatched == n


def test_rules_set_get_list_delete(client):
    full = rld.RuleSpec(
        "tenant-42", "tenant-42", "export/*", limit=10, window=3600, burst=3,
        expire_idle=86400, reserve=rld.Reserve(high=0, normal=100, low=300),
    )
    assert client.set_rules([API, full]) == 2
    assert client.set_rules([API, full]) == 0, "nothing changed"
    info = client.get_rule("tenant-42")
    assert info.spec == full, "the rule comes back exactly as sent"
    assert info.source is rld.RuleSource.RUNTIME and info.lease is None
    assert sorted(r.spec.id for r in client.list_rules()) == ["api", "tenant-42"]
    assert client.delete_rule("tenant-42") is None
    with pytest.raises(rld.RuleNotFound, match="tenant-42"):
        client.get_rule("tenant-42")
    with pytest.raises(rld.RuleNotFound):
        client.delete_rule("tenant-42")
    assert [r.spec.id for r in client.list_rules()] == ["api"]


def test_stacked_rules_shadows_and_explain(client):
    each = rld.RuleSpec("each", "*", "jobs/*", limit=2, window=3600, per="client")
    total = rld.RuleSpec("total", "*", "jobs/*", limit=3, window=3600, per=rld.Per.NONE)
    shadow = rld.RuleSpec("next", "*", "*", limit=1, window=3600, per="resource", shadow=True)
    assert client.set_rules([each, total, shadow]) == 3
    assert client.get_rule("total").spec == total, "per comes back as sent"
    assert client.get_rule("next").spec.shadow is True
    assert [d.outcome for d in (client.acquire("a", "jobs/x") for _ in range(3))] == [
        rld.Outcome.ALLOWED,
        rld.Outcome.ALLOWED,
        rld.Outcome.DENIED,
    ]
    assert client.acquire("b", "jobs/x").allowed
    # The total is spent; explaining spends nothing and says so.
    e = client.explain("c", "jobs/y")
    assert e.decision.outcome is rld.Outcome.DENIED and e.decision.rule == "total"
    assert [(r.id, r.outcome) for r in e.rules] == [
        ("each", rld.Outcome.ALLOWED),
        ("next", rld.Outcome.ALLOWED),
        ("total", rld.Outcome.DENIED),
    ]
    assert e.rules[0].tokens == 2 and e.rules[2].client == "" and e.rules[2].resource == ""
    again = client.explain("c", "jobs/y")
    assert [(r.id, r.tokens, r.outcome) for r in again.rules] == [
        (r.id, r.tokens, r.outcome) for r in e.rules
    ], "the first explain spent nothing"
    counters = {r.spec.id: (r.allowed, r.rejected) for r in client.list_rules()}
    assert counters == {"each": (3, 1), "total": (3, 0), "next": (1, 3)}


def test_invalid_rules_are_refused_naming_the_field_and_nothing_changes(client):
    bad = rld.RuleSpec("bad", "*", "x", limit=5, window=0)
    with pytest.raises(rld.InvalidRule, match=r'rule "bad": window is 0s') as info:
        client.set_rules([API, bad])
    assert info.value.code == 7
    assert client.list_rules() == [], "all or none"
    with pytest.raises(rld.InvalidRule, match="reserve"):
        inverted = rld.Reserve(high=500, low=100)
        client.set_rule(rld.RuleSpec("r", "*", "x", limit=5, window=1, reserve=inverted))
    with pytest.raises(rld.InvalidRule):
        client.set_rule(rld.RuleSpec("g", "*", "x", limit=5, window=1, scope="global"))


def test_config_rules_are_read_only(start_daemon):
    daemon = start_daemon(CONFIG_RULE)
    with rld.Client(daemon.socket) as client:
        (info,) = client.list_rules()
        assert info.spec.id == "from-config" and info.source is rld.RuleSource.CONFIG
        assert info.spec.window == 60.0
        with pytest.raises(rld.RuleReadOnly) as e:
            client.delete_rule("from-config")
        assert e.value.code == 14


def test_stats_and_health(client):
    client.set_rule(API)
    for _ in range(3):
        client.acquire("alice", "api/x")
    client.acquire("alice", "elsewhere")
    stats = client.stats()
    assert (stats.allowed, stats.rejected, stats.unmatched) == (2, 1, 1)
    assert stats.per_rule == [rld.RuleCounters("api", 2, 1, 0)]
    assert stats.rules == 1 and stats.buckets >= 1 and stats.connections_open >= 1
    assert stats.latency.count >= 1 and stats.cluster is None and stats.uptime > 0
    health = client.health()
    assert health.state is rld.ServingState.OK and health.mode == "standalone"
    assert health.version == "0.1.0" and health.rules == 1 and health.etcd is None


def test_the_announced_max_frame_is_enforced(start_daemon):
    daemon = start_daemon("max_frame = 64\n")
    with rld.Client(daemon.socket) as client:
        assert client.connect().max_frame == 64
        with pytest.raises(rld.FrameTooLarge, match="not sent"):
            client.acquire("alice", "r" * 100)
        with pytest.raises(rld.FrameTooLarge):
            client.acquire_many([("alice", "x")] * 20)
        assert client.acquire("alice", "r").allowed
        assert client.stats().protocol_errors == 0, "nothing oversized reached the daemon"


def test_a_refused_connection_says_too_many_connections(start_daemon):
    daemon = start_daemon(args=["--max-connections", "1"])
    with rld.Client(daemon.socket) as first, rld.Client(daemon.socket) as second:
        first.connect()
        with pytest.raises(rld.TooManyConnections, match="limit of 1 connections") as e:
            second.health()
        assert isinstance(e.value, rld.Unavailable) and e.value.code == 11
        assert first.stats().connections_rejected == 1


def raw_exchange(path: str, data: bytes) -> List[Frame]:
    """Sends raw bytes and reads response frames until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        buf = b""
        for _ in range(1000):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        frames = []
        while buf:
            n = wire.frame_length(buf)
            frames.append(wire.decode_response(buf[4 : 4 + n]))
            buf = buf[4 + n :]
        return frames


def as_error(frame: Frame) -> rld.RldError:
    assert frame.kind == "Error", frame
    return rld.errors.error_for(frame.value.code, frame.value.message)


def test_the_daemons_protocol_errors_decode_to_their_classes(daemon):
    hello = wire.encode_request(Frame(1, "Hello", 1))
    (frame,) = raw_exchange(daemon.socket, wire.encode_request(Frame(5, "Hello", 0)))
    assert frame.id == 5 and type(as_error(frame)) is rld.UnsupportedVersion
    # A version above the daemon's, from a version 2+ client: the range as fields.
    (frame,) = raw_exchange(daemon.socket, wire.encode_request(Frame(5, "Hello", 99)))
    assert frame == Frame(5, "UnsupportedVersion", rld.messages.VersionRange(99, 1, 3))
    (frame,) = raw_exchange(daemon.socket, wire.encode_request(Frame(6, "Stats")))
    assert type(as_error(frame)) is rld.HandshakeRequired
    ok, frame = raw_exchange(daemon.socket, hello + bytes.fromhex("00000002 07 2a"))
    assert ok.kind == "HelloOk" and frame.id == 7 and type(as_error(frame)) is rld.UnknownRequest
    ok, frame = raw_exchange(daemon.socket, hello + (70_000).to_bytes(4, "big"))
    assert frame.id == 0 and type(as_error(frame)) is rld.FrameTooLarge
    ok, frame = raw_exchange(daemon.socket, hello + bytes.fromhex("00000003 08 01 05"))
    assert frame.id == 8 and type(as_error(frame)) is rld.MalformedFrame


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_rule_changes_need_an_admin(start_daemon):
    daemon = start_daemon('socket_mode = "0666"\n')
    os.chmod(daemon.dir, 0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an unprivileged user, reporting through the pipe
        outcome = "nothing"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with rld.Client(daemon.socket) as c:
                allowed = c.acquire("nobody", "x").allowed
                try:
                    c.set_rule(API)
                    outcome = "set"
                except rld.PermissionDenied as e:
                    outcome = f"denied {allowed} {e.code}"
        except BaseException as e:
            outcome = f"error {e!r}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        assert ready, "the child did not report"
        assert os.read(read_end, 1000).decode() == "denied True 9"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_threads_share_a_client(client):
    client.set_rule(rld.RuleSpec("api", "*", "api/*", limit=1000, window=60))
    failures = []

    def work(n: int) -> None:
        try:
            for _ in range(50):
                assert client.acquire(f"thread-{n}", "api/x").allowed
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and failures == []
    stats = client.stats()
    assert stats.allowed == 400 and stats.connections_total == 1


def test_a_forked_child_opens_its_own_connection(client):
    client.connect()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = "nothing"
        try:
            outcome = str(client.health().state)
        except BaseException as e:
            outcome = f"error {e!r}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        assert ready, "the child did not report"
        assert os.read(read_end, 1000).decode() == "ok"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    stats = client.stats()
    assert stats.connections_total == 2, "the parent's connection was left alone"
