"""The slice lifecycle as a data table. A missing entry is an illegal transition.

::

    queued --lease--> leased --accept--> done
      ^  \\             |  \\--exhaust--> failed --reset--> queued
      |   \\--accept--> done  (a late result under the last token issued, nobody else holds it)
      +--expire/fail/return--+
    queued|leased --cancel--> cancelled
    voting --accept--> done     a replicated slice: its replicas (slices of their own) agreed
    voting --exhaust--> failed  no quorum within the job's max_replicas
    voting --cancel--> cancelled

``exhaust`` is what ``expire`` and ``fail`` become once the slice has used its attempts. A
replicated slice is ``voting`` from its deploy (and again after a ``reset``) until decided; it
is never leased itself (scheduler/quorum.py).
"""

from __future__ import annotations

from enum import StrEnum

from .errors import DcpError

__all__ = ["SliceState", "SliceEvent", "IllegalTransition", "SLICE_TRANSITIONS", "transition"]


class SliceState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    VOTING = "voting"


class SliceEvent(StrEnum):
    LEASE = "lease"
    ACCEPT = "accept"
    EXPIRE = "expire"
    FAIL = "fail"
    EXHAUST = "exhaust"
    RETURN = "return"
    CANCEL = "cancel"
    RESET = "reset"


class IllegalTransition(DcpError):
    """``event`` is not allowed in ``state``."""

    def __init__(self, state: SliceState, event: SliceEvent) -> None:
        super().__init__(f"slice event {event.value!r} is not allowed in state {state.value!r}")
        self.state = state
        self.event = event


S, E = SliceState, SliceEvent
SLICE_TRANSITIONS: dict[tuple[SliceState, SliceEvent], SliceState] = {
    (S.QUEUED, E.LEASE): S.LEASED,
    (S.QUEUED, E.ACCEPT): S.DONE,
    (S.QUEUED, E.CANCEL): S.CANCELLED,
    (S.LEASED, E.ACCEPT): S.DONE,
    (S.LEASED, E.EXPIRE): S.QUEUED,
    (S.LEASED, E.FAIL): S.QUEUED,
    (S.LEASED, E.EXHAUST): S.FAILED,
    (S.LEASED, E.RETURN): S.QUEUED,
    (S.LEASED, E.CANCEL): S.CANCELLED,
    (S.FAILED, E.RESET): S.QUEUED,
    (S.VOTING, E.ACCEPT): S.DONE,
    (S.VOTING, E.EXHAUST): S.FAILED,
    (S.VOTING, E.CANCEL): S.CANCELLED,
}
del S, E

#: States from which a slice never moves without an operator's ``reset``.
FINAL_STATES = frozenset({SliceState.DONE, SliceState.FAILED, SliceState.CANCELLED})


def transition(state: SliceState, event: SliceEvent) -> SliceState:
    """The state after ``event``.

    Raises:
        IllegalTransition: the table has no entry for (state, event).
    """
    try:
        return SLICE_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None
