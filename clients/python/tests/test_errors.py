"""Error codes become typed exceptions, grouped in families."""

from __future__ import annotations

import builtins

import pytest

import rld
from rld.errors import error_for

FAMILIES = {
    0: (rld.MalformedFrame, rld.ProtocolError),
    1: (rld.FrameTooLarge, rld.ProtocolError),
    2: (rld.UnsupportedVersion, rld.ProtocolError),
    3: (rld.HandshakeRequired, rld.ProtocolError),
    4: (rld.UnknownRequest, rld.ProtocolError),
    5: (rld.InvalidArgument, rld.InvalidRequest),
    6: (rld.CostExceedsBurst, rld.InvalidRequest),
    7: (rld.InvalidRule, rld.InvalidRequest),
    8: (rld.RuleNotFound, rld.InvalidRequest),
    9: (rld.PermissionDenied, rld.RldError),
    10: (rld.StorageFailed, rld.Unavailable),
    11: (rld.TooManyConnections, rld.Unavailable),
    12: (rld.ShuttingDown, rld.Unavailable),
    13: (rld.InternalError, rld.RldError),
    14: (rld.RuleReadOnly, rld.InvalidRequest),
    15: (rld.Unavailable, rld.RldError),
}


def test_every_documented_code_has_a_class_in_its_family():
    assert sorted(FAMILIES) == sorted(rld.CODE_NAMES)
    for code, (cls, family) in FAMILIES.items():
        e = error_for(code, "why")
        assert type(e) is cls and isinstance(e, family) and isinstance(e, rld.RldError)
        assert (e.code, e.message) == (code, "why")
        assert str(e) == f"why ({code} {rld.CODE_NAMES[code]})"


def test_unknown_codes_are_kept():
    e = error_for(999, "from the future")
    assert type(e) is rld.RldError
    assert (e.code, e.code_name) == (999, "unknown")


def test_transport_errors_are_also_builtin_exceptions():
    assert issubclass(rld.ConnectionError, builtins.ConnectionError)
    assert issubclass(rld.TimeoutError, builtins.TimeoutError)
    with pytest.raises(builtins.TimeoutError):
        raise rld.TimeoutError("slow")
    e = rld.ConnectionError("gone")
    assert e.code is None and e.code_name is None and str(e) == "gone"


def test_rate_limited_carries_the_decision():
    d = rld.Decision(rld.Outcome.DENIED, 5, 0, 1_500_000_000, 3_000_000_000, "r")
    e = rld.RateLimited("rate limited", d)
    assert e.decision is d and e.retry_after == 1.5 and e.code is None
