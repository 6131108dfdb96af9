"""Redis clients with the timeouts, keepalive and retries every long-running process needs.

A half-open connection (a restarted server, a dropped NAT entry) must fail within a bound, and a blip must not
surface as an error to the loop that made the call: redis-py retries a failed command on a fresh connection
with jittered exponential backoff. Every multi-key step is a Lua script written to be safe to run twice.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_SECONDS = 5.0
# Above the longest BLOCK any caller uses (a worker filling a batch waits up to 10 s).
READ_TIMEOUT_SECONDS = 15.0
RETRIES = 3
HEALTH_CHECK_SECONDS = 30


def _options() -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": READ_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_SECONDS,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def connect(url: str, **overrides: Any) -> redis.Redis:
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), RETRIES)
    return redis.Redis.from_url(url, retry=retry, **{**_options(), **overrides})


def connect_async(url: str, **overrides: Any) -> aioredis.Redis:
    from redis.asyncio.retry import Retry as AsyncRetry

    retry = AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), RETRIES)
    return aioredis.Redis.from_url(url, retry=retry, **{**_options(), **overrides})
