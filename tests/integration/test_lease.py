"""Two operator replicas: one holds the lease; the other takes over only after it lapses."""

import pytest
import redis

from conftest import wait_for
from zimage_operator.lease import Lease, LeaseLost


def test_one_holder_and_takeover_after_expiry(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    a, b = Lease(r, "operator-a", ttl_seconds=0.3), Lease(r, "operator-b", ttl_seconds=0.3)
    assert a.held() and not b.held()
    assert a.held() and not b.held()  # renewing keeps it
    # a stops renewing (crashed): b gets it once the lease lapses, and a no longer has it
    assert wait_for(b.held, timeout=5, what="takeover")
    assert not a.held()


def test_a_lease_that_may_have_lapsed_fences_the_holder(redis_url: str) -> None:
    t = [100.0]
    r = redis.Redis.from_url(redis_url)
    a = Lease(r, "operator-a", ttl_seconds=10, clock=lambda: t[0])
    assert a.held()
    a.check()  # within its term
    t[0] += 7.9
    a.check()
    t[0] += 0.2  # past 80 % of the term without a renewal: another replica may hold it soon
    with pytest.raises(LeaseLost):
        a.check()
    assert a.held()  # renewed: writes may go on
    a.check()
    r.delete(a.key)
    r.set(a.key, "operator-b")
    assert not a.held()
    with pytest.raises(LeaseLost):
        a.check()
