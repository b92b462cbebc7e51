"""The client against a scripted fake daemon: id matching, failures in
flight, reconnection, local frame limits, timeouts, default socket path."""

from __future__ import annotations

import os
import threading
import time

import pytest

import rld
from rld import wire
from rld.client import _Ids
from rld.messages import ErrorBody
from rld.wire import Frame

ALLOWED = rld.Decision(rld.Outcome.ALLOWED, 10, 9, 0, 100, "r")


def decision_for(request: Frame) -> Frame:
    """A Decision naming the request's client as its rule, to tell answers apart."""
    decision = rld.Decision(rld.Outcome.ALLOWED, 1, 0, 0, 0, request.value.client)
    return Frame(request.id, "Decision", decision)


def test_default_socket_path(tmp_path):
    path = rld.default_socket_path
    assert path({"RLD_SOCKET": "/x/rld.sock"}, euid=1000) == "/x/rld.sock"
    assert path({"RLD_SOCKET": ""}, euid=0) == "/run/rld/rld.sock"
    assert path({}, euid=0) == "/run/rld/rld.sock"
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert path(env, euid=1000) == "/run/rld/rld.sock", "user socket only if it exists"
    (tmp_path / "rld.sock").touch()
    assert path(env, euid=1000) == str(tmp_path / "rld.sock")
    assert path(env, euid=0) == "/run/rld/rld.sock", "root uses the system daemon"


def test_client_takes_rld_socket_from_the_environment(monkeypatch):
    monkeypatch.setenv("RLD_SOCKET", "/somewhere/rld.sock")
    assert rld.Client().path == "/somewhere/rld.sock"


def test_request_ids_skip_zero_when_they_wrap():
    ids = _Ids(start=_Ids.MAX - 1)
    assert [ids.take() for _ in range(3)] == [_Ids.MAX - 1, _Ids.MAX, 1]


def test_answers_are_matched_to_requests_by_id(fake_server):
    seen = []

    def serve(conn, n):
        conn.hello()
        requests = [conn.read() for _ in range(3)]
        seen.extend(r.id for r in requests)
        for r in reversed(requests):
            conn.send(decision_for(r))
        assert conn.at_eof()

    server = fake_server(serve)
    with rld.Client(server.path, timeout=5) as client:
        p = client.pipeline().acquire("a", "x").acquire("b", "x").acquire("c", "x")
        assert len(p) == 3
        results = p.execute()
    assert [d.rule for d in results] == ["a", "b", "c"]
    assert 0 not in seen and len(set(seen)) == 3


def test_a_request_in_flight_fails_when_the_daemon_goes_away_and_the_next_call_reconnects(fake_server):
    hellos = []

    def serve(conn, n):
        conn.hello()
        hellos.append(n)
        request = conn.read()
        if n == 0:
            return  # "crash": close without answering
        conn.send(Frame(request.id, "Health", rld.HealthReport("ok", "0.1.0", 1, 0, "standalone")))
        assert conn.at_eof()

    server = fake_server(serve)
    with rld.Client(server.path, timeout=5) as client:
        with pytest.raises(rld.ConnectionError, match="closed the connection .* 1 request.* unanswered"):
            client.health()
        assert client.server_info is None
        assert client.health().mode == "standalone"
    assert hellos == [0, 1], "a new Hello on the new connection"


def test_a_connection_the_daemon_closed_while_idle_is_replaced_before_sending(fake_server):
    closed = threading.Event()

    def serve(conn, n):
        conn.hello()
        if n == 0:
            conn.sock.close()
            closed.set()
            return
        request = conn.read()
        conn.send(decision_for(request))
        assert conn.at_eof()

    server = fake_server(serve)
    with rld.Client(server.path, timeout=5) as client:
        client.connect()
        assert closed.wait(10)
        assert client.acquire("again", "x").rule == "again"
    assert server.accepted == 2


def test_an_error_with_id_zero_fails_the_first_unanswered_request(fake_server):
    def serve(conn, n):
        conn.hello()
        requests = [conn.read() for _ in range(3)]
        conn.send(decision_for(requests[0]))
        conn.send(Frame(0, "Error", ErrorBody(0, "malformed frame: bad")))

    server = fake_server(serve)
    with rld.Client(server.path, timeout=5) as client:
        p = client.pipeline().acquire("a", "x").acquire("b", "x").stats()
        results = p.execute(raise_on_error=False)
        assert results[0].rule == "a"
        assert type(results[1]) is rld.MalformedFrame and results[1].code == 0
        assert type(results[2]) is rld.ConnectionError
        assert "earlier request failed" in str(results[2])
        with pytest.raises(rld.MalformedFrame):
            client.pipeline().acquire("a", "x").acquire("b", "x").stats().execute()


def test_an_answer_to_no_request_is_a_protocol_error(fake_server):
    def serve(conn, n):
        conn.hello()
        request = conn.read()
        conn.send(Frame(request.id + 100, "Decision", ALLOWED))

    server = fake_server(serve, max_connections=1)
    with rld.Client(server.path, timeout=5) as client:
        with pytest.raises(rld.ProtocolError, match="matches no request"):
            client.acquire("a", "x")
        assert client.server_info is None, "connection dropped"


def test_an_answer_of_the_wrong_type_is_a_protocol_error(fake_server):
    def serve(conn, n):
        conn.hello()
        request = conn.read()
        conn.send(Frame(request.id, "RuleDeleted"))
        assert conn.at_eof()

    server = fake_server(serve, max_connections=1)
    with rld.Client(server.path, timeout=5) as client:
        with pytest.raises(rld.ProtocolError, match="answered RuleDeleted to a Stats request"):
            client.stats()


def test_answers_split_across_reads_are_reassembled(fake_server):
    def serve(conn, n):
        conn.hello()
        requests = [conn.read() for _ in range(2)]
        data = b"".join(wire.encode_response(decision_for(r)) for r in requests)
        for i in range(len(data)):
            conn.send_raw(data[i : i + 1])
        assert conn.at_eof()

    server = fake_server(serve, max_connections=1)
    with rld.Client(server.path, timeout=5) as client:
        results = client.pipeline().acquire("first", "x").acquire("second", "x").execute()
        assert [d.rule for d in results] == ["first", "second"]


@pytest.mark.parametrize(
    "raw,error,match",
    [
        (b"\x01\x00\x00\x01", rld.ProtocolError, "above the 16777216 maximum"),
        (b"\x00\x00\x00\x02\x01\x63", rld.MalformedFrame, "unknown Response variant 99"),
    ],
)
def test_unreadable_answers_are_protocol_errors(fake_server, raw, error, match):
    def serve(conn, n):
        conn.hello()
        conn.read()
        conn.send_raw(raw)
        assert conn.at_eof()

    server = fake_server(serve, max_connections=1)
    with rld.Client(server.path, timeout=5) as client:
        with pytest.raises(error, match=match):
            client.health()
        assert client.server_info is None


def test_connecting_to_nothing_is_a_connection_error(sockdir):
    path = os.path.join(sockdir, "nothing.sock")
    with pytest.raises(rld.ConnectionError, match=f"cannot connect to rld at {path}.*is rld running"):
        rld.Client(path).health()


def test_a_daemon_that_never_answers_hello_times_out(fake_server):
    def serve(conn, n):
        assert conn.read().kind == "Hello"
        assert conn.at_eof(), "the client gives up and closes"

    server = fake_server(serve, max_connections=1)
    client = rld.Client(server.path, timeout=5, connect_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(rld.TimeoutError, match="handshake within 0.3s"):
        client.health()
    assert 0.25 <= time.monotonic() - start < 3


def test_requests_above_the_announced_max_frame_are_refused_before_sending(fake_server):
    def serve(conn, n):
        conn.hello(max_frame=64)
        request = conn.read()
        assert request.kind == "Stats", "the oversized acquire was never sent"
        conn.send(Frame(request.id, "Error", ErrorBody(13, "just checking")))
        assert conn.at_eof()

    server = fake_server(serve, max_connections=1)
    with rld.Client(server.path, timeout=5) as client:
        assert client.connect().max_frame == 64
        with pytest.raises(rld.FrameTooLarge, match="exceeds rld's maximum frame of 64 bytes") as info:
            client.acquire("a", "x" * 100)
        assert info.value.code == 1
        with pytest.raises(rld.FrameTooLarge):
            client.pipeline().stats().acquire("a", "x" * 100).execute()
        with pytest.raises(rld.InternalError, match="just checking"):
            client.stats()


def test_bad_arguments_fail_where_they_are_given():
    client = rld.Client("/nonexistent/rld.sock")
    with pytest.raises(ValueError, match="cost"):
        client.pipeline().acquire("a", "x", cost=-1)
    with pytest.raises(ValueError, match="unknown Priority"):
        client.acquire("a", "x", priority="urgent")
    with pytest.raises(TypeError, match="acquire item"):
        client.acquire_many(["a"])
