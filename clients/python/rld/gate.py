"""Gating code on a decision: :class:`Gate` is what :meth:`rld.Client.limit`
and :meth:`rld.Client.gate` return, a context manager and a decorator that
acquires first and raises :class:`rld.RateLimited` when denied, optionally
waiting out ``retry_after`` until a deadline. It holds no state between
uses, so one gate may guard many calls and threads."""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import RateLimited
from .messages import Acquire, Decision

if TYPE_CHECKING:
    from .client import Client

MIN_RETRY_DELAY = 0.001
"""Shortest sleep between tries, in seconds (a denial's retry_after is
normally longer; this only keeps a zero from spinning)."""


class Gate(contextlib.ContextDecorator):
    """Acquires on entry (``with gate as decision:``) or before each call of a
    decorated function; see :meth:`rld.Client.limit`."""

    def __init__(
        self,
        client: "Client",
        request: Acquire,
        wait: bool,
        timeout: Optional[float],
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must not be negative, got {timeout!r}")
        self.client = client
        self.request = request
        self.wait = wait
        self.timeout = timeout
        self._sleep = sleep
        self._clock = clock

    def acquire(self) -> Decision:
        """Asks the daemon (again, with ``wait``, while denied and time is
        left) and returns the allowing decision.

        Raises:
            rld.RateLimited: denied, and with ``wait`` not allowed in time.
            rld.RldError: the request failed (e.g. CostExceedsBurst, which
                waiting cannot fix).
        """
        r = self.request
        deadline = None if self.timeout is None else self._clock() + self.timeout
        while True:
            decision = self.client.acquire(r.client, r.resource, r.cost, r.priority, r.trace)
            if decision.allowed:
                return decision
            delay = max(decision.retry_after, MIN_RETRY_DELAY)
            if not self.wait:
                raise RateLimited(self._denied(decision), decision)
            if deadline is not None and self._clock() + delay > deadline:
                why = f" (not before the {self.timeout}s timeout)"
                raise RateLimited(self._denied(decision, why), decision)
            self._sleep(delay)

    def _denied(self, d: Decision, why: str = "") -> str:
        r = self.request
        rule = f"rule {d.rule!r}, limit {d.limit}" if d.rule else "default action"
        return (
            f"rate limited: {r.client!r} on {r.resource!r} ({rule}); "
            f"retry after {d.retry_after:.3f}s{why}"
        )

    def __enter__(self) -> Decision:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Decorates a (synchronous) function."""
        if inspect.iscoroutinefunction(func):
            raise TypeError(
                f"{func.__qualname__} is a coroutine function; rld's client is blocking, "
                "so gate it inside the coroutine (e.g. with asyncio.to_thread(gate.acquire))"
            )
        return super().__call__(func)
