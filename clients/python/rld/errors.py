"""Exceptions: one class per protocol error code, grouped in families.

::

    RldError                      .code (None if not from the daemon), .message
    ├── ProtocolError             the conversation broke; the daemon closes
    │   ├── MalformedFrame        0   (also: a response this client cannot read)
    │   ├── FrameTooLarge         1   (also: refused here, above HelloOk.max_frame)
    │   ├── UnsupportedVersion    2
    │   ├── HandshakeRequired     3
    │   └── UnknownRequest        4
    ├── InvalidRequest            the request is wrong; retrying will not help
    │   ├── InvalidArgument       5
    │   ├── CostExceedsBurst      6
    │   ├── InvalidRule           7
    │   ├── RuleNotFound          8
    │   └── RuleReadOnly          14
    ├── PermissionDenied          9
    ├── Unavailable               15  (and the family: retry later)
    │   ├── StorageFailed         10
    │   ├── TooManyConnections    11
    │   └── ShuttingDown          12
    ├── InternalError             13
    ├── ConnectionError           transport: cannot connect, connection lost
    ├── TimeoutError              transport: no answer in time
    └── RateLimited               raised by Client.limit / Client.gate only

A code this client does not know yet is raised as plain :class:`RldError`
with its ``code``. ``rld.ConnectionError`` and ``rld.TimeoutError`` also
derive from the built-in exceptions of the same name.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Dict, Optional, Type

if TYPE_CHECKING:
    from .messages import Decision

CODE_NAMES: Dict[int, str] = {
    0: "malformed_frame",
    1: "frame_too_large",
    2: "unsupported_version",
    3: "handshake_required",
    4: "unknown_request",
    5: "invalid_argument",
    6: "cost_exceeds_burst",
    7: "invalid_rule",
    8: "rule_not_found",
    9: "permission_denied",
    10: "storage_failed",
    11: "too_many_connections",
    12: "shutting_down",
    13: "internal",
    14: "rule_read_only",
    15: "unavailable",
}
"""Protocol error codes and their names (rld-protocol(7), ERROR CODES)."""


class RldError(Exception):
    """Base of every error of this package.

    Attributes:
        code: the protocol error code when the daemon sent it (or when the
            client refused a request for the same reason, e.g. a frame above
            the daemon's maximum); ``None`` for transport and client-side errors.
        message: the daemon's (or client's) explanation, for humans.
    """

    code: Optional[int]
    message: str

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def code_name(self) -> Optional[str]:
        """The code's name (``"invalid_rule"``), ``"unknown"`` for a code from a
        newer daemon, ``None`` without a code."""
        if self.code is None:
            return None
        return CODE_NAMES.get(self.code, "unknown")

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{self.message} ({self.code} {self.code_name})"


class ProtocolError(RldError):
    """The conversation with the daemon broke: a frame it (or this client)
    could not read, a request it does not know, a missing handshake. The
    connection is closed; the next call reconnects."""


class MalformedFrame(ProtocolError):
    """Code 0: the frame is not a valid message."""


class FrameTooLarge(ProtocolError):
    """Code 1: a request above the daemon's maximum frame. The client checks
    this before sending (``HelloOk.max_frame``), so usually nothing was sent;
    split the batch."""


class UnsupportedVersion(ProtocolError):
    """Code 2: the daemon does not speak this client's protocol version."""


class HandshakeRequired(ProtocolError):
    """Code 3: the first request was not Hello."""


class UnknownRequest(ProtocolError):
    """Code 4: a request type this daemon does not know."""


class InvalidRequest(RldError):
    """The request itself is wrong; sending it again will not help."""


class InvalidArgument(InvalidRequest):
    """Code 5: e.g. an empty or too long client or resource name."""


class CostExceedsBurst(InvalidRequest):
    """Code 6: the cost can never be allowed by the matching rule at this
    priority (above its burst, less the priority's reserve)."""


class InvalidRule(InvalidRequest):
    """Code 7: a rule failed validation; the message names the field."""


class RuleNotFound(InvalidRequest):
    """Code 8: no rule with that id."""


class RuleReadOnly(InvalidRequest):
    """Code 14: the rule comes from the daemon's config file."""


class PermissionDenied(RldError):
    """Code 9: this process may not change rules (rule changes need root,
    the daemon's user or its admin group)."""


class Unavailable(RldError):
    """Code 15 (a backend such as etcd is unreachable), and the family of
    errors worth retrying later."""


class StorageFailed(Unavailable):
    """Code 10: the rule change could not be saved; nothing changed."""


class TooManyConnections(Unavailable):
    """Code 11: the daemon is at its connection limit."""


class ShuttingDown(Unavailable):
    """Code 12: the daemon is stopping."""


class InternalError(RldError):
    """Code 13: a bug in the daemon."""


class ConnectionError(RldError, builtins.ConnectionError):  # noqa: A001
    """The daemon is unreachable, or the connection broke. A request that was
    in flight may or may not have been applied; the next call reconnects."""


class TimeoutError(RldError, builtins.TimeoutError):  # noqa: A001
    """No answer (or no connection) within the timeout. The connection is
    dropped (a late answer could not be matched); the next call reconnects."""


class RateLimited(RldError):
    """Raised by :meth:`rld.Client.limit` and :meth:`rld.Client.gate` when
    the request is denied (and, with ``wait=True``, could not be allowed
    before the deadline).

    Attributes:
        decision: the daemon's last :class:`rld.Decision`.
        retry_after: seconds until the same request would be allowed.
    """

    def __init__(self, message: str, decision: "Decision") -> None:
        super().__init__(message)
        self.decision = decision
        self.retry_after = decision.retry_after


_BY_CODE: Dict[int, Type[RldError]] = {
    0: MalformedFrame,
    1: FrameTooLarge,
    2: UnsupportedVersion,
    3: HandshakeRequired,
    4: UnknownRequest,
    5: InvalidArgument,
    6: CostExceedsBurst,
    7: InvalidRule,
    8: RuleNotFound,
    9: PermissionDenied,
    10: StorageFailed,
    11: TooManyConnections,
    12: ShuttingDown,
    13: InternalError,
    14: RuleReadOnly,
    15: Unavailable,
}


def error_for(code: int, message: str) -> RldError:
    """The exception for an error the daemon sent (plain :class:`RldError`
    for a code this client does not know)."""
    return _BY_CODE.get(code, RldError)(message, code)
