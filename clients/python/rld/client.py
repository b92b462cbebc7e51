"""The client: one connection per :class:`Client`, opened lazily and reopened
after the daemon restarts; every call is a request matched to its answer
by id, and a :class:`Pipeline` sends many before reading.

Reconnection never repeats a request: a connection found closed *before*
sending is replaced silently; a request already sent when the connection
breaks fails with :class:`rld.ConnectionError` (it may or may not have been
applied), and the next call reconnects with a new Hello.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from . import errors, wire
from .connection import Connection, default_socket_path
from .gate import Gate
from .messages import (
    Acquire,
    Decision,
    ErrorBody,
    Explanation,
    HealthReport,
    Per,
    Priority,
    RuleInfo,
    RuleSpec,
    ServerInfo,
    StatsReport,
    TraceContext,
)

DEFAULT_TIMEOUT = 5.0
"""Seconds a call may take when the caller says nothing (as rlctl)."""

AcquireItem = Union[Acquire, Tuple[Any, ...], dict]
"""An item of :meth:`Client.acquire_many`: an :class:`rld.Acquire`, a tuple
``(client, resource[, cost[, priority]])`` or a dict of Acquire's fields."""

Result = Union[Any, errors.RldError]


class _Ids:
    """Request ids: 1, 2, ... wrapping back to 1, never 0 (reserved for
    errors the daemon cannot attribute to a request)."""

    MAX = (1 << 64) - 1

    def __init__(self, start: int = 1) -> None:
        self._next = start

    def take(self) -> int:
        id = self._next
        self._next = 1 if id >= self.MAX else id + 1
        return id


class _Call:
    """A request ready to frame (its body encoded at once, so a bad argument
    fails where it was given) and how to turn its answer into a result."""

    def __init__(
        self,
        kind: str,
        value: Any,
        expect: str,
        convert: Callable[[Any], Any],
        older: Optional["_Call"] = None,
        needs: int = 1,
        why: str = "",
    ) -> None:
        self.kind = kind
        self.body = wire.request_body(kind, value)
        self.expect = expect
        self.convert = convert
        self.older = older
        """The same request for a daemon older than ``needs``, if it has one."""
        self.needs = needs
        """The oldest protocol version that has this request."""
        self.why = why

    def for_version(self, version: int) -> "_Call":
        """This call as a daemon speaking ``version`` takes it.

        Raises:
            rld.UnsupportedVersion: the daemon is too old for it (not sent).
        """
        if version >= self.needs:
            return self
        if self.older is not None:
            return self.older.for_version(version)
        raise errors.UnsupportedVersion(
            f"{self.why or self.kind} needs protocol version {self.needs}; this rld speaks "
            f"version {version}: upgrade rld",
            code=2,
        )

    def result(self, frame: wire.Frame) -> Result:
        if frame.kind == "Error":
            return errors.error_for(frame.value.code, frame.value.message)
        if frame.kind != self.expect:
            return errors.ProtocolError(
                f"rld answered {frame.kind} to a {self.kind} request; "
                "is the daemon the same protocol version as this client?"
            )
        return self.convert(frame.value)


def _item(value: AcquireItem) -> Acquire:
    if isinstance(value, Acquire):
        return value
    if isinstance(value, dict):
        return Acquire(**value)
    if isinstance(value, tuple):
        return Acquire(*value)
    raise TypeError(f"an acquire item is an Acquire, a tuple or a dict, not {value!r}")


def _batch_result(item: Union[Decision, ErrorBody]) -> Union[Decision, errors.RldError]:
    if isinstance(item, ErrorBody):
        return errors.error_for(item.code, item.message)
    return item


def _same(value: Any) -> Any:
    return value


def _nothing(value: Any) -> None:
    return None


class _Requests:
    """Every request type, once, for :class:`Client` (which sends at once
    and returns the result) and :class:`Pipeline` (which queues)."""

    def _submit(self, call: _Call) -> Any:
        raise NotImplementedError

    def acquire(
        self,
        client: str,
        resource: str,
        cost: int = 1,
        priority: Union[Priority, str] = Priority.NORMAL,
        traceparent: Union[str, TraceContext, None] = None,
    ) -> Decision:
        """May ``client`` use ``resource`` now, spending ``cost`` tokens
        (0 asks without spending)? Returns the :class:`rld.Decision`; a
        denial is a decision, not an exception.

        ``priority`` is ``"low"``, ``"normal"``, ``"high"`` or ``"critical"``
        (never denied; outcome ``bypassed`` when over the limit).
        ``traceparent`` is a W3C traceparent to link the daemon's spans.

        Raises:
            rld.CostExceedsBurst: the cost can never be allowed by the rule.
            rld.InvalidArgument: an empty or too long name.
            ValueError, TypeError: an argument that cannot be encoded.
        """
        item = Acquire(client, resource, cost, priority, traceparent)
        return self._submit(_Call("Acquire", item, "Decision", _same))

    def acquire_many(self, items: Iterable[AcquireItem]) -> List[Union[Decision, errors.RldError]]:
        """Many acquires in one request, decided independently and in order.
        Returns one entry per item: a :class:`rld.Decision`, or the error of
        that item as an exception *instance* (e.g. :class:`rld.CostExceedsBurst`),
        not raised. Items are :data:`AcquireItem`.

        Raises:
            rld.FrameTooLarge: the batch is above the daemon's frame limit
                (nothing was sent); split it.
        """
        batch = [_item(i) for i in items]
        return self._submit(
            _Call("AcquireMany", batch, "Decisions", lambda v: [_batch_result(i) for i in v])
        )

    def set_rules(self, rules: Sequence[RuleSpec]) -> int:
        """Creates or replaces rules, all or none. Returns how many were
        created or changed. Needs root, the daemon's user or its admin group.

        Raises:
            rld.InvalidRule: the message names the rule and field.
            rld.PermissionDenied, rld.StorageFailed, rld.Unavailable.
        """
        rules = list(rules)
        stacked = next((r for r in rules if r.per != Per.CLIENT_RESOURCE or r.shadow), None)
        older = (
            _Call("RuleSet", rules, "RulesApplied", _same)
            if stacked is None
            else None
        )
        why = "" if stacked is None else f"rule {stacked.id!r} (per or shadow)"
        return self._submit(
            _Call("RuleSetV3", rules, "RulesApplied", _same, older=older, needs=3, why=why)
        )

    def set_rule(self, rule: RuleSpec) -> int:
        """:meth:`set_rules` with one rule."""
        return self.set_rules([rule])

    def get_rule(self, id: str) -> RuleInfo:
        """One rule and its counters.

        Raises:
            rld.RuleNotFound
        """
        return self._submit(
            _Call("RuleGetV3", id, "RuleV3", _same, older=_Call("RuleGet", id, "Rule", _same), needs=3)
        )

    def list_rules(self) -> List[RuleInfo]:
        """Every rule in force, with counters."""
        return self._submit(
            _Call(
                "RuleListV3", None, "RulesV3", _same, older=_Call("RuleList", None, "Rules", _same), needs=3
            )
        )

    def explain(
        self,
        client: str,
        resource: str,
        cost: int = 1,
        priority: Union[Priority, str] = Priority.NORMAL,
    ) -> Explanation:
        """What an acquire would meet now, spending nothing: every rule that
        matches (applying, or overridden and by what), its bucket's tokens,
        what it would decide, and the answer. Needs protocol version 3.

        Raises:
            rld.UnsupportedVersion: the daemon is older (nothing sent).
        """
        request = Acquire(client, resource, cost, Priority.parse(priority))
        return self._submit(_Call("Explain", request, "Explanation", _same, needs=3))

    def delete_rule(self, id: str) -> None:
        """Deletes a rule set at run time.

        Raises:
            rld.RuleNotFound, rld.RuleReadOnly (a config-file rule),
            rld.PermissionDenied.
        """
        return self._submit(_Call("RuleDelete", id, "RuleDeleted", _nothing))

    def stats(self) -> StatsReport:
        """Counters, gauges and decision latency."""
        return self._submit(_Call("Stats", None, "Stats", _same))

    def health(self) -> HealthReport:
        """Whether the daemon is serving, its version and mode."""
        return self._submit(_Call("Health", None, "Health", _same))


class Client(_Requests):
    """A connection to rld, opened on first use and reopened when needed.

    Args:
        path: the daemon's socket; default as ``rlctl``: ``$RLD_SOCKET``,
            else (non-root) ``$XDG_RUNTIME_DIR/rld.sock`` if it exists, else
            ``/run/rld/rld.sock``.
        timeout: seconds one call (or one :meth:`Pipeline.execute`) may take
            to send and be answered; ``None`` waits forever. On expiry
            :class:`rld.TimeoutError` is raised and the connection dropped.
        connect_timeout: seconds to connect and complete the handshake
            (default: ``timeout``). A call that must reconnect may take
            ``connect_timeout + timeout``.

    Safe to share between threads: calls are serialised over the one
    connection (use a client per thread for parallel requests, or a
    pipeline). Usable as a context manager, which closes the connection.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        connect_timeout: Optional[float] = None,
    ) -> None:
        self.path = str(path) if path is not None else default_socket_path()
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._conn: Optional[Connection] = None
        self._ids = _Ids()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Client(path={self.path!r}, timeout={self.timeout!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def server_info(self) -> Optional[ServerInfo]:
        """The daemon's HelloOk on the current connection (``None`` when not
        connected)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.server

    def connect(self) -> ServerInfo:
        """Connects now (if not connected) and returns the daemon's HelloOk.
        Calls connect on their own; this only fails earlier.

        Raises:
            rld.ConnectionError, rld.TimeoutError, rld.RldError (a refusal).
        """
        with self._lock:
            return self._connection().server

    def close(self) -> None:
        """Closes the connection. The client stays usable: the next call
        reconnects."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def pipeline(self) -> "Pipeline":
        """A :class:`Pipeline`: queue calls, then send them all at once."""
        return Pipeline(self)

    def limit(
        self,
        client: str,
        resource: str,
        cost: int = 1,
        priority: Union[Priority, str] = Priority.NORMAL,
        *,
        wait: bool = False,
        timeout: Optional[float] = None,
        traceparent: Union[str, TraceContext, None] = None,
    ) -> Gate:
        """A context manager that acquires on entry and raises
        :class:`rld.RateLimited` when denied::

            with client.limit("alice", "jobs/backup") as decision:
                run_backup()

        With ``wait=True`` it sleeps the ``retry_after`` the daemon gives and
        asks again, until allowed or until ``timeout`` seconds have passed
        (``None``: no limit); it raises at once when the next try would be
        past the deadline. Also usable as a decorator (see :meth:`gate`).
        """
        return Gate(self, Acquire(client, resource, cost, priority, traceparent), wait, timeout)

    def gate(
        self,
        client: str,
        resource: str,
        cost: int = 1,
        priority: Union[Priority, str] = Priority.NORMAL,
        *,
        wait: bool = False,
        timeout: Optional[float] = None,
        traceparent: Union[str, TraceContext, None] = None,
    ) -> Gate:
        """A decorator: each call of the function first acquires, as
        :meth:`limit`, and raises :class:`rld.RateLimited` instead of calling
        it when denied::

            @client.gate("alice", "jobs/backup", wait=True, timeout=10)
            def backup(): ...
        """
        return self.limit(
            client, resource, cost, priority, wait=wait, timeout=timeout, traceparent=traceparent
        )

    def _submit(self, call: _Call) -> Any:
        (result,) = self._execute([call])
        if isinstance(result, errors.RldError):
            raise result
        return result

    def _connection(self) -> Connection:
        """The open connection, replacing one the daemon closed meanwhile
        (called with the lock held)."""
        conn = self._conn
        if conn is not None and conn.usable():
            return conn
        if conn is not None:
            conn.close()
            self._conn = None
        self._conn = Connection.open(self.path, self.connect_timeout)
        return self._conn

    def _execute(self, calls: Sequence[_Call]) -> List[Result]:
        """Sends ``calls`` in one write and returns their results in order;
        a call whose answer did not come gets the reason as its result."""
        results: List[Result] = [None] * len(calls)
        with self._lock:
            conn = self._connection()
            calls = [c.for_version(conn.server.version) for c in calls]
            ids = [self._ids.take() for _ in calls]
            frames = [wire.frame(id, call.body) for id, call in zip(ids, calls)]
            for call, data in zip(calls, frames):
                size = len(data) - wire.HEADER_LEN
                if size > conn.server.max_frame:
                    raise errors.FrameTooLarge(
                        f"{call.kind} request of {size} bytes exceeds rld's maximum frame of "
                        f"{conn.server.max_frame} bytes (not sent); split the batch",
                        code=1,
                    )
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            answers, failure = conn.exchange(b"".join(frames), len(calls), deadline)
            pending = {id: i for i, id in enumerate(ids)}
            for frame in answers:
                i = pending.pop(frame.id, None)
                if i is None:
                    failure = errors.ProtocolError(
                        f"rld answered id {frame.id}, which matches no request in flight"
                    )
                    break
                results[i] = calls[i].result(frame)
            if failure is not None:
                conn.close()
                self._conn = None
        if failure is not None:
            for n, i in enumerate(sorted(pending.values())):
                results[i] = failure if n == 0 or failure.code is None else _unanswered(failure)
        return results


def _unanswered(cause: errors.RldError) -> errors.ConnectionError:
    return errors.ConnectionError(
        f"not answered: rld closed the connection after an earlier request failed ({cause})"
    )


class Pipeline(_Requests):
    """Queued calls sent in one write; the answers are read together and
    matched to the calls by id. The request methods (:meth:`acquire`,
    :meth:`stats`, ...) queue and return the pipeline, so calls chain::

        results = client.pipeline().acquire("a", "x").acquire("b", "x").stats().execute()

    :meth:`execute` empties the queue, so a pipeline can be reused. Not
    thread-safe. As a context manager, calls not executed by the end of the
    block are discarded.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._calls: List[_Call] = []

    def __len__(self) -> int:
        return len(self._calls)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self._calls = []

    def _submit(self, call: _Call) -> "Pipeline":
        self._calls.append(call)
        return self

    def execute(self, raise_on_error: bool = True) -> List[Any]:
        """Sends every queued call and returns their results in order (what
        each method returns on :class:`Client`), then empties the queue.

        A call that failed has its exception in its place. With
        ``raise_on_error`` (the default) the first of them is raised instead,
        after every answer has been read; pass ``False`` to see which calls
        succeeded (acquires that were answered have spent their tokens).
        The client's ``timeout`` bounds the whole exchange.

        Raises:
            rld.FrameTooLarge: a call is above the daemon's frame limit;
                nothing was sent.
            rld.ConnectionError, rld.TimeoutError: cannot connect.
        """
        calls, self._calls = self._calls, []
        if not calls:
            return []
        results = self._client._execute(calls)
        if raise_on_error:
            for result in results:
                if isinstance(result, errors.RldError):
                    raise result
        return results
