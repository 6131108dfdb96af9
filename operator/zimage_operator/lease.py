"""A leader lease in Redis: with two operator replicas, one runs the pool and deadline loops.

kopf's peering pauses handlers on the standby replica, but not the operator's own background loops; those
would both scale the same pools. The lease lives where the loops' data lives, so a replica that has lost
Redis also loses the lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from zimage_queue import keys

# Renew if we hold it, take it if it is free; 1 when held by us afterwards.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


# Of the lease's term, the share this replica trusts: the rest covers clock drift between it and Redis.
FENCE_SHARE = 0.8


class LeaseLost(Exception):
    """This replica can no longer be sure it holds the lease: it must stop writing (fencing)."""


class Lease:
    def __init__(
        self,
        client: Any,
        holder: str,
        ttl_seconds: float = 5.0,
        key: str = keys.OPERATOR_LEASE,
        clock: Callable[[], float] = time.monotonic,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self.key = key
        # Whether this replica may lead at all (kopf peering: only while its handlers run); None: always.
        self.gate = gate
        self.holder = holder
        self.ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self.clock = clock
        self.valid_until = 0.0

    def held(self) -> bool:
        """Take or renew the lease; call at least every ttl/2 while working."""
        asked = self.clock()  # the lease runs from before the request: a slow reply only shortens it here
        if self.gate is not None and not self.gate():
            self.valid_until = 0.0
            return False  # not released: it lapses, and the active replica takes it then
        ok = bool(int(self._acquire(keys=[self.key], args=[self.holder, self.ttl_ms])))
        self.valid_until = asked + self.ttl_ms / 1000 * FENCE_SHARE if ok else 0.0
        return ok

    def check(self) -> None:
        """Before each write of a leader's pass: a lease that may have lapsed mid-pass stops the pass, since
        another replica may hold it by now."""
        if self.clock() >= self.valid_until:
            raise LeaseLost(f"lease {self.key} not renewed within its term; stopping this pass")
