"""Redis clients with the timeouts, keepalive and retries every long-running process needs.

A half-open connection (a restarted server, a dropped NAT entry) must fail within a bound, and a blip must not
surface as an error to the loop that made the call: redis-py retries a failed command on a fresh connection
with jittered exponential backoff. Every multi-key step is a Lua script written to be safe to run twice.

The URL picks the deployment (``parse``):

* ``redis://host:port/db`` (or ``rediss://``, ``unix://``): one server, as always;
* ``redis+cluster://host:port[,host:port...]/`` or ``redis://host:port/?cluster=true``: a Redis Cluster through
  redis-py's ``RedisCluster`` (the nodes listed are only where discovery starts);
* ``redis+sentinel://host:port[,host:port...]/service[/db]``: the master Sentinel names ``service``.

``?wait_replicas=N`` (any kind) makes the queue confirm its acceptance and terminal writes on N replicas with
``WAIT`` (``zimage_queue.queue.JobQueue``); a cluster defaults to 1, the others to 0.

A password and a CA bundle come apart from the URL (``Credentials``, read by each process's settings from
``ZIMAGE_REDIS_PASSWORD`` / ``_PASSWORD_FILE``, ``ZIMAGE_REDIS_USERNAME``, ``ZIMAGE_REDIS_CA_FILE`` /
``_CA_CERT``: ``RedisAuthSettings``), so a URL in a pod spec or a log line carries none. They take precedence over
a password in the URL. ``rediss://`` (``rediss+cluster://``, ``rediss+sentinel://``) speaks TLS, and verifies the
server's certificate and host name against the CA bundle, else the system's trust store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterDownError, SlotNotCoveredError
from redis.retry import Retry

CONNECT_TIMEOUT_SECONDS = 5.0
# Above the longest BLOCK any caller uses (a worker filling a batch waits up to 10 s).
READ_TIMEOUT_SECONDS = 15.0
RETRIES = 3
# A cluster failover takes the node timeout (2 s on the test bed) plus an election, and redis-py's cluster
# client retries at once (refreshing its slot map) without waiting: ``ClusterClient`` wraps each command in a
# second retry that backs off, for about 12 s in all, before the caller's own backoff takes over.
CLUSTER_RETRIES = 3
FAILOVER_RETRIES = 15
HEALTH_CHECK_SECONDS = 30

SyncClient = redis.Redis | RedisCluster
AsyncClient = aioredis.Redis | AsyncRedisCluster
Kind = Literal["single", "cluster", "sentinel"]

_TRUE = {"1", "true", "yes", "on"}
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Where a URL points: the kind of deployment, and what each client needs to reach it."""

    kind: Kind
    url: str  # the URL redis-py reads for a single server (our own query options removed)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes, or the sentinels
    service: str = ""  # the Sentinel master name
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    wait_replicas: int | None = None


@dataclass(frozen=True)
class Credentials:
    """What a connection needs besides its URL: an ACL user and password, and the CA bundle (a file, or the PEM
    itself) that signed the server's certificate. Never part of a repr, so never of a log line."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    ca_data: str | None = field(default=None, repr=False)

    def ca_pem(self) -> str | None:
        """The CA bundle's text (what the operator copies for worker pods), from ``ca_data`` or ``ca_file``."""
        if self.ca_data:
            return self.ca_data
        return Path(self.ca_file).read_text() if self.ca_file else None


class RedisAuthSettings(BaseModel):
    """The Redis credentials every process reads (a mixin of its ``BaseSettings``): the same variables in each,
    whatever its own prefix. The password never goes into a URL; worker pods get it from a Secret."""

    model_config = ConfigDict(populate_by_name=True)

    redis_username: str = Field("", validation_alias=AliasChoices("ZIMAGE_REDIS_USERNAME", "redis_username"))
    redis_password: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ZIMAGE_REDIS_PASSWORD", "redis_password")
    )
    # A file holding the password (a mounted Secret); read once, at the first connection. Wins over the above.
    redis_password_file: str = Field(
        "", validation_alias=AliasChoices("ZIMAGE_REDIS_PASSWORD_FILE", "redis_password_file")
    )
    # The CA bundle of a rediss:// server: a file, or the PEM text itself (how the chart hands it over).
    redis_ca_file: str = Field("", validation_alias=AliasChoices("ZIMAGE_REDIS_CA_FILE", "redis_ca_file"))
    redis_ca_cert: str = Field("", validation_alias=AliasChoices("ZIMAGE_REDIS_CA_CERT", "redis_ca_cert"))

    @cached_property
    def redis_credentials(self) -> Credentials:
        password = self.redis_password.get_secret_value() if self.redis_password else None
        if self.redis_password_file:
            password = Path(self.redis_password_file).read_text().rstrip("\r\n")
        return Credentials(
            username=self.redis_username or None,
            password=password or None,
            ca_file=self.redis_ca_file or None,
            ca_data=self.redis_ca_cert or None,
        )


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for part in netloc.rpartition("@")[2].split(","):
        if part.startswith("["):  # [::1]:6379
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = part.partition(":")
        if not host:
            raise ValueError(f"no host in {netloc!r}")
        out.append((host, int(port) if port else default_port))
    return tuple(out)


def parse(url: str) -> Target:
    """Read a Redis URL (pure). Raises ValueError for a scheme or option it does not know."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    cluster_flag = query.pop("cluster", "").lower() in _TRUE
    wait_raw = query.pop("wait_replicas", None)
    wait_replicas = int(wait_raw) if wait_raw not in (None, "") else None
    if wait_replicas is not None and wait_replicas < 0:
        raise ValueError("wait_replicas must be 0 or more")
    base, _, variant = scheme.partition("+")
    if base not in ("redis", "rediss", "unix") or variant not in ("", "cluster", "sentinel"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    kind: Kind = "cluster" if variant == "cluster" or cluster_flag else "sentinel" if variant else "single"
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    ssl = base == "rediss"
    if kind == "single":
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
        return Target("single", clean, username=username, password=password, ssl=ssl, wait_replicas=wait_replicas)
    if base == "unix":
        raise ValueError(f"a {kind} URL needs host:port nodes")
    nodes = _hosts(parts.netloc, 26379 if kind == "sentinel" else 6379)
    segments = [s for s in parts.path.split("/") if s]
    service = ""
    db = 0
    if kind == "sentinel":
        if not segments:
            raise ValueError("a Sentinel URL names its master: redis+sentinel://host:port/<service>[/<db>]")
        service = unquote(segments[0])
        db = int(segments[1]) if len(segments) > 1 else 0
    elif segments and segments[0] != "0":
        raise ValueError("a Redis Cluster has only database 0")
    if query:
        raise ValueError(f"a {kind} URL takes only the cluster and wait_replicas options, not {sorted(query)}")
    single = urlunsplit(("rediss" if ssl else "redis", parts.netloc.split(",")[0], "", "", ""))
    return Target(kind, single, nodes, service, db, username, password, ssl, wait_replicas)


def _options() -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": READ_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_SECONDS,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=2.0)


def _cluster_backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=1.0, base=0.1)


def _auth(t: Target, creds: Credentials | None = None) -> dict[str, Any]:
    c = creds or Credentials()
    out: dict[str, Any] = {}
    if username := c.username or t.username:
        out["username"] = username
    if password := c.password or t.password:
        out["password"] = password
    if t.ssl:
        out.update(ssl=True, **_tls(t, c))
    elif c.ca_file or c.ca_data:
        raise ValueError("a Redis CA bundle is set, but the URL does not speak TLS (rediss://)")
    return out


def _tls(t: Target, c: Credentials) -> dict[str, Any]:
    out: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if c.ca_file:
        out["ssl_ca_certs"] = c.ca_file
    if c.ca_data:
        out["ssl_ca_data"] = c.ca_data
    return out


def _single(t: Target, creds: Credentials | None) -> tuple[str, dict[str, Any]]:
    """The URL and keyword arguments of a single server's client: redis-py lets a URL's userinfo win over the
    arguments, so the URL loses its userinfo when the credentials say otherwise."""
    options = _auth(t, creds)
    options.pop("ssl", None)  # the scheme says it
    url = t.url
    if creds and (creds.username or creds.password):
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return url, options


CLUSTER_ERRORS = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, SlotNotCoveredError)


def failover_retry() -> Retry:
    return Retry(_cluster_backoff(), FAILOVER_RETRIES, supported_errors=CLUSTER_ERRORS)


class ClusterClient(RedisCluster):
    """``RedisCluster`` whose commands ride out a failover: each is retried with backoff while the cluster
    elects a new master (safe: every command the queue sends is safe to run twice, see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._failover_retry = failover_retry()
        super().__init__(*args, **kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return self._failover_retry.call_with_retry(
            lambda: super(ClusterClient, self).execute_command(*args, **kwargs), _ignore
        )


def unblocked(error: Exception) -> bool:
    """A blocking read cut short because its server stopped being a master (a cluster or Sentinel failover):
    nothing was read, and the next command finds the new master. Not a failure of the read's caller."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("UNBLOCKED")


def _ignore(_error: Exception) -> None:
    return None


def retrying(client: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` (a pipeline built and executed, say) again with backoff while a cluster fails over; at once
    on a single server, whose client retries by itself."""
    if isinstance(client, RedisCluster):
        return failover_retry().call_with_retry(fn, _ignore)
    return fn()


def _sentinel_options(t: Target, creds: Credentials | None) -> dict[str, Any]:
    """How the sentinels themselves are reached: the timeouts, and TLS with the same CA when the URL says
    ``rediss+sentinel``. Not the password: that is the master's (Sentinel's own ``requirepass`` is separate)."""
    out: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT_SECONDS, "socket_timeout": CONNECT_TIMEOUT_SECONDS}
    if t.ssl:
        out.update(ssl=True, **_tls(t, creds or Credentials()))
    return out


def connect(url: str, credentials: Credentials | None = None, **overrides: Any) -> SyncClient:
    """A client for the URL's deployment; ``credentials`` (the process's settings) win over the URL's userinfo."""
    t = parse(url)
    if t.kind == "cluster":
        return ClusterClient(
            startup_nodes=[ClusterNode(h, p) for h, p in t.nodes],
            retry=Retry(_cluster_backoff(), CLUSTER_RETRIES),
            **{**_options(), **_auth(t, credentials), **overrides},
        )
    retry = Retry(_backoff(), RETRIES)
    if t.kind == "sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(
            list(t.nodes),
            sentinel_kwargs=_sentinel_options(t, credentials),
            **{**_options(), **_auth(t, credentials)},
        )
        client: redis.Redis = sentinel.master_for(t.service, db=t.db, retry=retry, **overrides)
        return client
    single, auth = _single(t, credentials)
    return redis.Redis.from_url(single, retry=retry, **{**_options(), **auth, **overrides})


def connect_async(url: str, credentials: Credentials | None = None, **overrides: Any) -> AsyncClient:
    from redis.asyncio.retry import Retry as AsyncRetry

    t = parse(url)
    if t.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode as AsyncClusterNode

        options = {k: v for k, v in _options().items() if k != "health_check_interval"}
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in t.nodes],
            retry=AsyncRetry(_cluster_backoff(), CLUSTER_RETRIES),
            **{**options, **_auth(t, credentials), **overrides},
        )
    retry = AsyncRetry(_backoff(), RETRIES)
    if t.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        sentinel = AsyncSentinel(
            list(t.nodes),
            sentinel_kwargs=_sentinel_options(t, credentials),
            **{**_options(), **_auth(t, credentials)},
        )
        client: aioredis.Redis = sentinel.master_for(t.service, db=t.db, retry=retry, **overrides)
        return client
    single, auth = _single(t, credentials)
    return aioredis.Redis.from_url(single, retry=retry, **{**_options(), **auth, **overrides})


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def wait_replicas(url: str) -> int | None:
    """The ``wait_replicas`` a URL asks for (None: the deployment's default)."""
    return parse(url).wait_replicas
