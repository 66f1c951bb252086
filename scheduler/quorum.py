"""Trust without a verifier: a replicated slice's votes, decided in pure functions.

A job that asks for redundancy (``quorum = k``) has each slice (an *input*) computed by several
workers, each replica its own lease (docs/protocol.md section 3, "Redundancy"). The store
(scheduler/store/sql.py) reads an input's replicas into :class:`Vote` records and asks
:func:`tally` what follows; it asks :func:`trusted` whether a worker's result may stand alone
(BOINC's adaptive replication). Nothing here touches the database, a clock or a socket: tests
feed votes and check decisions.

Rules, in order (each is a reason a result counts or not):

- A vote counts once its result is in (the replica is ``done``) and it was not forfeited
  (its worker was caught lying on this job meanwhile) nor caught itself.
- Two votes of one identity or one payment address on one input count once (the first):
  leases keep them apart, this holds even if a worker signs results to another address.
- With a known answer (the owner's spot check), the votes that match it win at once; the
  others lose at once, whether or not the input is decided.
- Otherwise the largest group of equal votes (equal bytes, or equal by the job's comparison
  function: the same ``key``) wins once it has ``needed`` votes; ties go to the group whose
  first vote came first.
- Until then, the replicas still out (queued or leased) may complete it; when they cannot, more
  replicas are made, never more than ``max_replicas`` in all; when none may be made and none is
  out, the input fails (``no_quorum``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Accept",
    "Fail",
    "Redundancy",
    "Replicate",
    "TRUST_AFTER",
    "Vote",
    "Wait",
    "network_of",
    "tally",
    "trusted",
]

#: Consecutive validated results before a worker may be trusted alone (BOINC's
#: CONS_VALID_UNREPLICATED); then with probability 1 - 1/count.
TRUST_AFTER = 10
#: The largest quorum a job may ask for, and the most replicas of one slice.
MAX_QUORUM = 16
MAX_REPLICAS = 32


@dataclass(frozen=True)
class Redundancy:
    """What a job asks for: ``quorum`` agreeing results per slice, at most ``max_replicas``
    replicas of one slice; ``adaptive``: a first result from a trusted worker may stand alone;
    ``spot_check_rate``: the fraction of such results replicated anyway."""

    quorum: int = 1
    max_replicas: int = 1
    adaptive: bool = False
    spot_check_rate: float = 0.0
    #: Replicas of one slice also go to distinct networks (:func:`network_of`).
    distinct_networks: bool = False

    @property
    def replicated(self) -> bool:
        return self.quorum > 1

    def first_replicas(self) -> int:
        """The replicas each slice starts with: one when adaptive, else the quorum."""
        return 1 if self.adaptive else self.quorum


@dataclass(frozen=True)
class Vote:
    """One replica of an input as the tally sees it: its slice index, lease state (queued,
    leased, done, failed, cancelled), who computed it (identity, payment address; lowercase)
    and, once done, its result's ``key`` (equal keys: equal results). ``forfeit``: its worker
    was caught lying on this job after it voted."""

    idx: int
    state: str
    worker: str | None = None
    payee: str | None = None
    key: str | None = None
    forfeit: bool = False

    @property
    def out(self) -> bool:
        """Still to come: queued or leased."""
        return self.state in ("queued", "leased")


@dataclass(frozen=True)
class Accept:
    """The input is decided: ``key`` wins; ``agreeing`` are paid and their workers validated,
    ``losing`` (counted votes of other keys, and repeated voters) are not paid and their
    workers lose their reputation; ``spare`` replicas still out are cancelled."""

    key: str
    agreeing: tuple[int, ...]
    losing: tuple[int, ...]
    spare: tuple[int, ...]


@dataclass(frozen=True)
class Replicate:
    """Make ``n`` more replicas of the input. ``losing``: votes a known answer caught."""

    n: int
    losing: tuple[int, ...] = ()


@dataclass(frozen=True)
class Wait:
    """Nothing to do until a replica still out comes back. ``losing``: votes a known answer
    caught."""

    losing: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fail:
    """No quorum is possible: the input fails with ``reason``. ``losing`` are the votes of
    workers caught by a known answer (the others are inconclusive, not lies)."""

    reason: str
    losing: tuple[int, ...] = ()


Decision = Accept | Replicate | Wait | Fail


def _counted(votes: Sequence[Vote]) -> tuple[list[Vote], list[Vote]]:
    """The votes that count, in slice order, and the repeated voters' (which lose)."""
    counted: list[Vote] = []
    repeated: list[Vote] = []
    seen: set[str] = set()
    for vote in sorted(votes, key=lambda v: v.idx):
        if vote.state != "done" or vote.forfeit or vote.key is None:
            continue
        who = {w for w in (vote.worker, vote.payee) if w}
        if who & seen:
            repeated.append(vote)
            continue
        seen |= who
        counted.append(vote)
    return counted, repeated


def tally(
    votes: Sequence[Vote], needed: int, max_replicas: int, known: str | None = None
) -> Decision:
    """What follows from an input's ``votes`` when ``needed`` must agree (see the module's
    rules); ``known``: the key of the owner's known answer, if the input has one."""
    counted, repeated = _counted(votes)
    out = [v for v in votes if v.out]
    made = len(votes)
    if known is not None:
        right = tuple(v.idx for v in counted if v.key == known)
        wrong = tuple(v.idx for v in counted if v.key != known) + tuple(v.idx for v in repeated)
        if right:
            return Accept(known, right, wrong, tuple(v.idx for v in out))
        if out:
            return Wait(wrong)
        if made < max_replicas:
            return Replicate(1, wrong)
        return Fail("no_quorum", wrong)
    groups: dict[str, list[int]] = {}
    for vote in counted:
        assert vote.key is not None
        groups.setdefault(vote.key, []).append(vote.idx)
    best_key, best = max(groups.items(), key=lambda kv: (len(kv[1]), -kv[1][0]), default=("", []))
    if len(best) >= needed:
        losing = tuple(v.idx for v in counted if v.key != best_key)
        losing += tuple(v.idx for v in repeated)
        return Accept(best_key, tuple(best), losing, tuple(v.idx for v in out))
    short = needed - len(best) - len(out)
    if short <= 0:
        return Wait()
    n = min(short, max_replicas - made)
    if n > 0:
        return Replicate(n)
    if out:
        return Wait()
    return Fail("no_quorum")


def network_of(address: str) -> str:
    """The network a worker connects from, as redundancy tells networks apart: an IPv4
    address's /24, an IPv6 address's /48 (a site's usual allocation; an IPv4-mapped one is its
    IPv4 address); anything else (a Unix socket, no address) is itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def trusted(consecutive_valid: int, draw: float, spot_draw: float, spot_check_rate: float) -> bool:
    """Whether a worker with ``consecutive_valid`` validated results in a row may have its
    result stand alone: at least TRUST_AFTER of them, then with probability
    1 - 1/consecutive_valid (``draw`` uniform in [0, 1)), and not picked for a spot check
    (``spot_draw`` uniform in [0, 1) below ``spot_check_rate``)."""
    if consecutive_valid < TRUST_AFTER:
        return False
    if draw < 1 / consecutive_valid:
        return False
    return spot_draw >= spot_check_rate
