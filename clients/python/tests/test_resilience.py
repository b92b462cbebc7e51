"""Timeouts against a stopped daemon, and reconnection after it restarts."""

from __future__ import annotations

import threading
import time

import pytest

import rld

RULE = rld.RuleSpec("api", "*", "api/*", limit=100, window=60)


def test_a_stopped_daemon_makes_calls_time_out_and_they_recover(daemon):
    client = rld.Client(daemon.socket, timeout=0.5)
    client.connect()
    daemon.pause()
    try:
        start = time.monotonic()
        with pytest.raises(rld.TimeoutError, match="did not answer 1 request"):
            client.health()
        elapsed = time.monotonic() - start
        assert 0.5 <= elapsed < 3, elapsed
        assert client.server_info is None, "a timed-out connection is dropped"

        fresh = rld.Client(daemon.socket, timeout=5, connect_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(rld.TimeoutError, match="handshake"):
            fresh.connect()
        assert 0.3 <= time.monotonic() - start < 3
    finally:
        daemon.resume()
    assert client.health().state is rld.ServingState.OK, "the next call reconnects"
    client.close()


def test_the_client_reconnects_after_the_daemon_restarts(daemon):
    with rld.Client(daemon.socket, timeout=5) as client:
        client.set_rule(RULE)
        assert client.acquire("alice", "api/x").allowed
        daemon.restart()
        # The old connection is dead; nothing was in flight, so the call
        # reconnects without an error (new Hello) and succeeds.
        assert client.get_rule("api").spec == RULE, "run-time rules survive the restart"
        stats = client.stats()
        assert stats.connections_total == 1 and stats.allowed == 0, "a new daemon"
        assert client.server_info.version == 3


def test_a_request_in_flight_when_the_daemon_dies_fails_and_the_next_call_reconnects(daemon):
    client = rld.Client(daemon.socket, timeout=20)
    client.connect()
    daemon.pause()
    outcome = []

    def call():
        try:
            outcome.append(client.health())
        except rld.RldError as e:
            outcome.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    # Wait (bounded) until the call holds the connection, then kill rld.
    deadline = time.monotonic() + 10
    while not client._lock.locked() and caller.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    daemon.kill()
    caller.join(20)
    assert not caller.is_alive()
    (error,) = outcome
    assert isinstance(error, rld.ConnectionError), error

    with pytest.raises(rld.ConnectionError, match="cannot connect"):
        client.health()
    daemon.start()
    assert client.health().state is rld.ServingState.OK
    client.close()
