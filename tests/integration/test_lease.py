"""Two operator replicas: one holds the lease; the other takes over only after it lapses."""

import redis

from conftest import wait_for
from zimage_operator.lease import Lease


def test_one_holder_and_takeover_after_expiry(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    a, b = Lease(r, "operator-a", ttl_seconds=0.3), Lease(r, "operator-b", ttl_seconds=0.3)
    assert a.held() and not b.held()
    assert a.held() and not b.held()  # renewing keeps it
    # a stops renewing (crashed): b gets it once the lease lapses, and a no longer has it
    assert wait_for(b.held, timeout=5, what="takeover")
    assert not a.held()
