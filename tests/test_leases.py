"""Lease tokens, numbers in and numbers out: what a token says of its key's version and of
the loader process that gave it."""

from __future__ import annotations

from clustorage.leases import Leases, base_version


def test_a_token_carries_its_keys_version_when_given() -> None:
    versions = {"fresh": 0, "deleted": 7}
    leases = Leases(versions.__getitem__)
    fresh = leases.grant("fresh", "peer", 1, ())
    deleted = leases.grant("deleted", "peer", 2, ())
    assert (base_version(fresh.token), base_version(deleted.token)) == (0, 7)
    assert fresh.token != deleted.token
    assert leases.granted_here(fresh.token) and leases.granted_here(deleted.token)


def test_a_lease_passed_on_or_renumbered_carries_the_version_then() -> None:
    versions = {"k": 3}
    leases = Leases(versions.__getitem__)
    lease = leases.grant("k", "first", 1, ())
    leases.wait(lease, "second", 2, ())
    versions["k"] = 4  # a delete of nothing but a tombstone, say, while it was held
    assert leases.pass_on(lease, lambda peer: True) is lease
    assert (lease.holder, base_version(lease.token)) == ("second", 4)
    kept = leases.adopt("other", "holder", 0)
    versions["other"] = 9
    leases.renumber(kept)
    assert base_version(kept.token) == 9 and leases.granted_here(kept.token)


def test_a_token_of_an_earlier_release_says_no_version() -> None:
    leases = Leases(lambda key: 5)
    earlier = (leases._incarnation << 32) | 1  # as tokens were made before versions
    assert base_version(earlier) is None and base_version(0) is None
    assert leases.granted_here(earlier)


def test_a_token_of_another_process_is_not_granted_here() -> None:
    one, two = Leases(lambda key: 5), Leases(lambda key: 5)
    token = one.grant("k", "peer", 1, ()).token
    assert one.granted_here(token)
    assert not two.granted_here(token)  # a random incarnation each: 1 in 2**30 alike
