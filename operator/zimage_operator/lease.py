"""A leader lease in Redis: with two operator replicas, one runs the pool and deadline loops.

kopf's peering pauses handlers on the standby replica, but not the operator's own background loops; those
would both scale the same pools. The lease lives where the loops' data lives, so a replica that has lost
Redis also loses the lease.
"""

from __future__ import annotations

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


class Lease:
    def __init__(self, client: Any, holder: str, ttl_seconds: float = 5.0, key: str = keys.OPERATOR_LEASE) -> None:
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)

    def held(self) -> bool:
        """Take or renew the lease; call at least every ttl/2 while working."""
        return bool(int(self._acquire(keys=[self.key], args=[self.holder, self.ttl_ms])))
