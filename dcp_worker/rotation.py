"""Which scheduler replica the worker connects to next, and when it backs off.

Several schedulers sharing one database are replicas (docs/protocol.md "Several schedulers"):
any of them accepts this worker's results and heartbeats, so a replica that refuses a
connection or drops a session is worth one immediate try of the next, not a backoff. The
backoff is for a round in which every replica failed: then the service is down, not one
machine, and retrying at once would only spin.

The decision is pure (no socket, no clock): the supervisor's connection loop reports what
happened and reads :attr:`SchedulerRotation.current`; the delays come from its backoff.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SchedulerRotation"]


class SchedulerRotation:
    """Round robin over the scheduler URLs, counting the failures of the current round.

    A round is one try of each URL since the last session opened (or the last backoff).
    With one URL every failure ends a round, which is the backoff the worker always had.

    Args:
        urls: the schedulers, in the order tried; the first is tried first.

    Raises:
        ValueError: no URL.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("a rotation needs at least one scheduler URL")
        self.urls = tuple(urls)
        self._index = 0
        #: URLs that failed in this round (the current one not yet counted).
        self._failed = 0

    @property
    def current(self) -> str:
        """The URL to connect to next, or the one connected to."""
        return self.urls[self._index]

    def connected(self) -> None:
        """A session opened on :attr:`current`: a new round starts with its loss."""
        self._failed = 0

    def lost(self) -> None:
        """The session on :attr:`current` was lost: the next try goes to the next URL, at
        once (as a lost session was always retried at once). The lost replica counts as the
        round's first failure, so a round in which the others refuse ends in a backoff."""
        self._advance()
        self._failed = 1

    def failed(self) -> bool:
        """Connecting to :attr:`current` failed; move to the next URL.

        Returns:
            True when that ended a round (every URL failed since the last session or the
            last backoff): back off before the next try. False: try the next one at once.
        """
        self._advance()
        self._failed += 1
        if self._failed >= len(self.urls):
            self._failed = 0
            return True
        return False

    def _advance(self) -> None:
        self._index = (self._index + 1) % len(self.urls)
