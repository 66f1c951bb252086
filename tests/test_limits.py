"""The unauthenticated-connection policy (scheduler.limits), driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from scheduler.limits import (
    ConnectionLimits,
    ConnectionRefusal,
    Ticket,
    UnauthenticatedConnections,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ticket(value: Ticket | ConnectionRefusal) -> Ticket:
    assert isinstance(value, Ticket), value
    return value


def test_the_per_address_limit_refuses_the_next_connection_and_a_release_frees_a_place() -> None:
    limiter = UnauthenticatedConnections(ConnectionLimits(per_address=2, total=10), Clock())
    a = _ticket(limiter.admit("10.0.0.1"))
    _ticket(limiter.admit("10.0.0.1"))
    assert limiter.admit("10.0.0.1") is ConnectionRefusal.TOO_MANY_FROM_ADDRESS
    _ticket(limiter.admit("10.0.0.2"))  # another address is not affected
    limiter.release(a)
    _ticket(limiter.admit("10.0.0.1"))
    assert limiter.held("10.0.0.1") == 2 and limiter.held() == 3
    stats = limiter.statistics()
    assert stats.refused[ConnectionRefusal.TOO_MANY_FROM_ADDRESS] == 1
    assert stats.addresses == 2


def test_the_total_limit_counts_every_address() -> None:
    limiter = UnauthenticatedConnections(ConnectionLimits(per_address=5, total=3), Clock())
    tickets = [_ticket(limiter.admit(f"10.0.0.{i}")) for i in range(3)]
    assert limiter.admit("10.0.0.9") is ConnectionRefusal.TOO_MANY
    limiter.release(tickets[1])
    _ticket(limiter.admit("10.0.0.9"))
    assert limiter.statistics().refused[ConnectionRefusal.TOO_MANY] == 1


def test_releasing_twice_does_not_free_two_places() -> None:
    limiter = UnauthenticatedConnections(ConnectionLimits(per_address=1, total=1), Clock())
    a = _ticket(limiter.admit("10.0.0.1"))
    limiter.release(a)
    limiter.release(a)
    _ticket(limiter.admit("10.0.0.1"))
    assert limiter.admit("10.0.0.1") is ConnectionRefusal.TOO_MANY
    assert limiter.held() == 1


def test_a_websocket_is_overdue_at_its_deadline_once_and_http_requests_never() -> None:
    clock = Clock()
    limiter = UnauthenticatedConnections(ConnectionLimits(auth_timeout=10.0), clock)
    ws = _ticket(limiter.admit("10.0.0.1", websocket=True))
    http = _ticket(limiter.admit("10.0.0.1"))
    assert ws.deadline == 110.0 and http.deadline is None
    clock.now = 109.99
    assert limiter.overdue() == []
    clock.now = 110.0
    assert limiter.overdue() == [ws]
    clock.now = 500.0
    assert limiter.overdue() == []  # reported once; the HTTP request has no deadline
    assert limiter.held() == 2  # still counted until its connection is gone
    limiter.release(ws)
    assert limiter.held() == 1 and limiter.statistics().overdue == 1


def test_an_authenticated_websocket_is_never_overdue() -> None:
    clock = Clock()
    limiter = UnauthenticatedConnections(ConnectionLimits(auth_timeout=1.0), clock)
    ws = _ticket(limiter.admit("10.0.0.1", websocket=True))
    clock.now += 0.5
    limiter.release(ws)  # welcome sent
    clock.now += 10
    assert limiter.overdue() == [] and limiter.held() == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"per_address": 0}, {"total": 0}, {"auth_timeout": 0.0}, {"auth_timeout": float("nan")}],
)
def test_limits_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ConnectionLimits(**kwargs)  # type: ignore[arg-type]
