"""Client.limit (context manager) and Client.gate (decorator): scripted
decisions for the waiting logic, then a real rld."""

from __future__ import annotations

import time
from typing import List

import pytest

import rld
from rld.gate import Gate


def denied(retry_after: float) -> rld.Decision:
    return rld.Decision(rld.Outcome.DENIED, 1, 0, int(retry_after * 1e9), int(retry_after * 1e9), "r")


ALLOWED = rld.Decision(rld.Outcome.ALLOWED, 1, 0, 0, 0, "r")


class Scripted:
    """Stands in for Client.acquire; time is a counter advanced by sleeps."""

    def __init__(self, decisions: List[rld.Decision]) -> None:
        self.decisions = list(decisions)
        self.calls = 0
        self.now = 0.0
        self.sleeps: List[float] = []

    def acquire(self, client, resource, cost, priority, trace):
        self.calls += 1
        return self.decisions.pop(0)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def gate(self, wait: bool, timeout=None) -> Gate:
        request = rld.Acquire("alice", "jobs")
        return Gate(self, request, wait, timeout, sleep=self.sleep, clock=lambda: self.now)


def test_without_wait_a_denial_raises_at_once():
    s = Scripted([denied(2.0)])
    with pytest.raises(rld.RateLimited, match=r"retry after 2\.000s") as e:
        s.gate(wait=False).acquire()
    assert e.value.retry_after == 2.0 and e.value.decision.rule == "r" and s.sleeps == []


def test_waiting_sleeps_each_retry_after_until_allowed():
    s = Scripted([denied(0.2), denied(0.3), ALLOWED])
    assert s.gate(wait=True, timeout=1).acquire() is ALLOWED
    assert s.sleeps == [0.2, 0.3] and s.calls == 3


def test_waiting_gives_up_when_the_next_try_is_past_the_deadline():
    s = Scripted([denied(0.4), denied(0.7)])
    with pytest.raises(rld.RateLimited, match="not before the 1s timeout"):
        s.gate(wait=True, timeout=1).acquire()
    assert s.sleeps == [0.4], "no sleep that could not end in time"


def test_without_a_timeout_waiting_has_no_deadline():
    s = Scripted([denied(3600)] * 3 + [ALLOWED])
    assert s.gate(wait=True).acquire().allowed and sum(s.sleeps) == 3 * 3600


def test_a_zero_retry_after_still_sleeps_a_little():
    s = Scripted([denied(0), ALLOWED])
    s.gate(wait=True, timeout=1).acquire()
    assert s.sleeps == [0.001]


def test_coroutine_functions_are_refused():
    async def job():
        pass

    with pytest.raises(TypeError, match="coroutine function"):
        Scripted([]).gate(wait=False)(job)


def test_negative_timeouts_are_refused():
    with pytest.raises(ValueError):
        Scripted([]).gate(wait=True, timeout=-1)


def test_limit_as_a_context_manager(client):
    client.set_rule(rld.RuleSpec("jobs", "*", "jobs/*", limit=1, window=60))
    ran = []
    with client.limit("alice", "jobs/backup") as decision:
        ran.append(decision)
    assert ran[0].allowed and ran[0].rule == "jobs"
    with pytest.raises(rld.RateLimited) as e:
        with client.limit("alice", "jobs/backup"):
            ran.append("should not run")
    assert len(ran) == 1 and 59 < e.value.retry_after <= 60


def test_gate_as_a_decorator(client):
    client.set_rule(rld.RuleSpec("jobs", "*", "jobs/*", limit=2, window=60))
    calls = []

    @client.gate("alice", "jobs/backup", cost=2)
    def backup(name: str) -> str:
        """Backs up."""
        calls.append(name)
        return f"done {name}"

    assert backup.__name__ == "backup" and backup.__doc__ == "Backs up."
    assert backup("first") == "done first"
    with pytest.raises(rld.RateLimited, match="'alice' on 'jobs/backup'"):
        backup("second")
    assert calls == ["first"]

    @client.gate("alice", "jobs/backup", cost=3)
    def never():
        calls.append("never")

    with pytest.raises(rld.CostExceedsBurst):
        never()
    assert calls == ["first"]


def test_gate_waits_for_the_bucket_to_refill(client):
    client.set_rule(rld.RuleSpec("jobs", "*", "jobs/*", limit=1, window=0.3))
    runs = []

    @client.gate("alice", "jobs/x", wait=True, timeout=10)
    def job():
        runs.append(time.monotonic())

    job()
    first_denial = client.acquire("alice", "jobs/x")
    assert not first_denial.allowed
    job()
    assert len(runs) == 2
    # The second run waited for the token the daemon said was missing.
    assert runs[1] - runs[0] >= first_denial.retry_after * 0.9 > 0


def test_gate_gives_up_before_a_deadline_it_cannot_meet(client):
    client.set_rule(rld.RuleSpec("jobs", "*", "jobs/*", limit=1, window=30))
    client.acquire("alice", "jobs/x")
    start = time.monotonic()
    with pytest.raises(rld.RateLimited, match="not before the 0.5s timeout"):
        with client.limit("alice", "jobs/x", wait=True, timeout=0.5):
            pass
    assert time.monotonic() - start < 0.5, "raised at once, not after sleeping"
