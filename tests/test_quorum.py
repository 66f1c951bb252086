"""scheduler/quorum.py: an input's votes decided without a store, a clock or a socket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from scheduler.quorum import TRUST_AFTER, Accept, Fail, Replicate, Vote, Wait, tally, trusted


def done(idx: int, key: str, who: str | None = None, payee: str | None = None) -> Vote:
    return Vote(idx, "done", who or f"w{idx}", payee or f"p{idx}", key)


def test_k_equal_votes_win_and_the_others_lose() -> None:
    votes = [done(10, "a"), done(11, "b"), done(12, "a"), Vote(13, "leased", "w13", "p13")]
    assert tally(votes, 2, 5) == Accept("a", (10, 12), (11,), (13,))


def test_a_disagreement_sends_one_more_replica_then_fails_at_max_replicas() -> None:
    votes = [done(10, "a"), done(11, "b")]
    assert tally(votes, 2, 3) == Replicate(1)
    assert tally([*votes, Vote(12, "queued")], 2, 3) == Wait()
    assert tally([*votes, done(12, "c")], 2, 3) == Fail("no_quorum")
    # A replica that failed (its attempts used) counts towards max_replicas too.
    assert tally([*votes, Vote(12, "failed", "w12")], 2, 3) == Fail("no_quorum")


def test_missing_votes_are_replicas_still_to_make() -> None:
    assert tally([], 3, 5) == Replicate(3)
    assert tally([done(10, "a")], 3, 5) == Replicate(2)
    assert tally([done(10, "a"), Vote(11, "leased")], 3, 5) == Replicate(1)
    assert tally([done(10, "a")], 3, 2) == Replicate(1)  # never past max_replicas


def test_one_identity_or_one_payment_address_counts_once() -> None:
    same_worker = [done(10, "x", "w", "p1"), done(11, "x", "w", "p2")]
    assert tally(same_worker, 2, 2) == Fail("no_quorum")
    same_payee = [done(10, "x", "w1", "p"), done(11, "x", "w2", "p"), done(12, "x")]
    assert tally(same_payee, 2, 4) == Accept("x", (10, 12), (11,), ())


def test_forfeited_votes_do_not_count() -> None:
    votes = [done(10, "a"), Vote(11, "done", "w11", "p11", "a", forfeit=True)]
    assert tally(votes, 2, 4) == Replicate(1)


def test_a_known_answer_decides_alone() -> None:
    assert tally([done(10, "right")], 2, 4, known="right") == Accept("right", (10,), (), ())
    assert tally([done(10, "wrong")], 2, 4, known="right") == Replicate(1, (10,))
    waiting = tally([done(10, "wrong"), Vote(11, "leased")], 2, 4, known="right")
    assert waiting == Wait((10,))
    caught = tally([done(10, "wrong"), done(11, "wrong")], 2, 2, known="right")
    assert caught == Fail("no_quorum", (10, 11))
    mixed = tally([done(10, "wrong"), done(11, "right")], 2, 4, known="right")
    assert mixed == Accept("right", (11,), (10,), ())


def test_ties_go_to_the_group_that_voted_first() -> None:
    votes = [done(10, "b"), done(11, "a"), done(12, "a"), done(13, "b")]
    assert tally(votes, 2, 4) == Accept("b", (10, 13), (11, 12), ())


@given(
    st.lists(st.sampled_from(["a", "b", "c", None]), max_size=8),
    st.integers(1, 4),
    st.integers(1, 8),
)
def test_a_decision_never_pays_a_minority_nor_passes_max_replicas(
    keys: list[str | None], needed: int, max_replicas: int
) -> None:
    votes = [
        done(i, key) if key is not None else Vote(i, "leased", f"w{i}")
        for i, key in enumerate(keys)
    ]
    decision = tally(votes, needed, max_replicas)
    if isinstance(decision, Accept):
        assert len(decision.agreeing) >= needed
        assert {votes[i].key for i in decision.agreeing} == {decision.key}
        assert all(votes[i].key != decision.key for i in decision.losing)
    elif isinstance(decision, Replicate):
        assert 0 < decision.n and len(votes) + decision.n <= max_replicas
    elif isinstance(decision, Fail):
        assert not any(v.out for v in votes) and len(votes) >= max_replicas


def test_trust_needs_a_streak_then_is_a_draw_and_spot_checks_override_it() -> None:
    assert not trusted(TRUST_AFTER - 1, 0.99, 0.99, 0.0)
    assert trusted(TRUST_AFTER, 0.5, 0.99, 0.0)
    assert not trusted(TRUST_AFTER, 0.05, 0.99, 0.0)  # 1 / 10: replicated
    assert not trusted(100, 0.5, 0.05, 0.1)  # picked for a spot check
    assert trusted(100, 0.5, 0.2, 0.1)
