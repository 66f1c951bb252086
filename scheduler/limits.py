"""Who may hold a connection open before proving who they are: a pure policy, no I/O.

Every HTTP request (the compute API, and the upgrade of a worker websocket) takes a ticket from
:class:`UnauthenticatedConnections` while it is served. A websocket keeps its ticket until its
``auth`` is accepted (``welcome``), and must get there within ``auth_timeout`` seconds; an HTTP
request gives its ticket back with its response. Over a limit a request is refused at once, with
a named reason. The server turns :meth:`~UnauthenticatedConnections.overdue` into closes.

Once authenticated (or not), a session that keeps sending frames the scheduler must refuse
(forged results, heartbeats of leases it does not hold, malformed frames) spends a
:class:`RefusalBudget`: past its burst, the server reads that session's next frame only when the
budget allows, so one client cannot buy more of the scheduler with refusals than it earns.

The clock is injected: tests drive it by hand; the server passes ``time.monotonic``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ConnectionLimits",
    "ConnectionRefusal",
    "LimiterStatistics",
    "RefusalBudget",
    "RefusalLimits",
    "Ticket",
    "UnauthenticatedConnections",
]


class ConnectionRefusal(StrEnum):
    """Named reasons a connection is refused or closed before it authenticated."""

    #: This remote address already holds ``per_address`` unauthenticated connections (503).
    TOO_MANY_FROM_ADDRESS = "too_many_unauthenticated_from_address"
    #: The server already holds ``total`` unauthenticated connections (503).
    TOO_MANY = "too_many_unauthenticated"
    #: A websocket did not complete ``auth`` within ``auth_timeout`` (close code 4008).
    AUTH_TIMEOUT = "auth_timeout"
    #: A request body did not arrive within the body timeout (408).
    BODY_TIMEOUT = "http_body_timeout"


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits on connections that have not authenticated (defaults for a public service).

    Attributes:
        per_address: unauthenticated connections one remote address may hold at once. Workers
            behind one NAT authenticate within a round trip, so they rarely hold many at once.
        total: unauthenticated connections the server holds at once, all addresses together.
        auth_timeout: seconds a websocket has from its upgrade to an accepted ``auth``.
    """

    per_address: int = 32
    total: int = 1024
    auth_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.per_address < 1 or self.total < 1:
            raise ValueError("connection limits must be at least 1")
        if not self.auth_timeout > 0:
            raise ValueError("auth_timeout must be positive")


@dataclass(frozen=True)
class Ticket:
    """One admitted, not yet authenticated connection. ``deadline`` is None for requests that
    are not bound by the auth timeout (plain HTTP requests end with their response)."""

    serial: int
    address: str
    deadline: float | None


@dataclass(frozen=True)
class LimiterStatistics:
    """A snapshot: connections held now, and refusals and overdue closes since the start."""

    held: int
    addresses: int
    refused: dict[str, int]
    overdue: int


class UnauthenticatedConnections:
    """Counts unauthenticated connections per remote address and in total.

    Args:
        limits: the limits.
        clock: seconds, monotonic (``time.monotonic`` unless a test drives it).
    """

    def __init__(
        self, limits: ConnectionLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ConnectionLimits()
        self._clock = clock
        self._serials = itertools.count()
        self._held: dict[int, Ticket] = {}
        self._by_address: dict[str, int] = {}
        self._reported: set[int] = set()  # overdue tickets already handed out
        self._refused = {r.value: 0 for r in ConnectionRefusal}
        self._overdue = 0

    def admit(self, address: str, *, websocket: bool = False) -> Ticket | ConnectionRefusal:
        """A ticket for a new connection from ``address``, or the reason it is refused.

        Args:
            address: the remote address (the key of the per-address limit).
            websocket: bind the ticket to the auth deadline.
        """
        if len(self._held) >= self.limits.total:
            return self._refuse(ConnectionRefusal.TOO_MANY)
        if self._by_address.get(address, 0) >= self.limits.per_address:
            return self._refuse(ConnectionRefusal.TOO_MANY_FROM_ADDRESS)
        deadline = self._clock() + self.limits.auth_timeout if websocket else None
        ticket = Ticket(next(self._serials), address, deadline)
        self._held[ticket.serial] = ticket
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The connection authenticated or ended; releasing twice is harmless."""
        if self._held.pop(ticket.serial, None) is None:
            return
        self._reported.discard(ticket.serial)
        left = self._by_address[ticket.address] - 1
        if left:
            self._by_address[ticket.address] = left
        else:
            del self._by_address[ticket.address]

    def overdue(self) -> list[Ticket]:
        """Tickets past their auth deadline, each returned once; they stay held (and counted)
        until released, when their connection is gone."""
        now = self._clock()
        due = [
            t
            for t in self._held.values()
            if t.deadline is not None and t.deadline <= now and t.serial not in self._reported
        ]
        self._reported.update(t.serial for t in due)
        self._overdue += len(due)
        return due

    def held(self, address: str | None = None) -> int:
        """Unauthenticated connections held now, from ``address`` or in all."""
        return len(self._held) if address is None else self._by_address.get(address, 0)

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            held=len(self._held),
            addresses=len(self._by_address),
            refused=dict(self._refused),
            overdue=self._overdue,
        )

    def _refuse(self, reason: ConnectionRefusal) -> ConnectionRefusal:
        self._refused[reason.value] += 1
        return reason


@dataclass(frozen=True)
class RefusalLimits:
    """How many refused frames a session may send (docs/configuration.md, "Limits").

    Attributes:
        burst: refused frames a session may send at once before it is slowed. An honest
            worker earns a few at most (results of leases that expired while it was offline
            come in one ``results`` frame, and a frame counts once however many it refuses).
        rate: refused frames per second a session may go on sending past its burst; the
            server reads its next frame only when its budget allows.
    """

    burst: int = 32
    rate: float = 1.0

    def __post_init__(self) -> None:
        if self.burst < 1:
            raise ValueError("the refusal burst must be at least 1")
        if not self.rate > 0:
            raise ValueError("the refusal rate must be positive")


class RefusalBudget:
    """One session's token bucket of refused frames: ``burst`` tokens, refilled at ``rate``
    a second. :meth:`charge` spends one and says how long to wait before reading the
    session's next frame (0 while the bucket held a token)."""

    def __init__(self, limits: RefusalLimits, now: float) -> None:
        self.limits = limits
        self._tokens = float(limits.burst)
        self._stamp = now
        #: Refused frames charged, and how many of them had to wait.
        self.charged = 0
        self.waited = 0

    def charge(self, now: float) -> float:
        """One refused frame at ``now``: the seconds to wait before the next frame is read."""
        elapsed = max(0.0, now - self._stamp)  # a clock never runs back here, but be safe
        self._stamp = max(self._stamp, now)
        self._tokens = min(float(self.limits.burst), self._tokens + elapsed * self.limits.rate)
        self._tokens -= 1.0
        self.charged += 1
        if self._tokens >= 0:
            return 0.0
        self.waited += 1
        return -self._tokens / self.limits.rate
