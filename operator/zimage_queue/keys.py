"""Every Redis key, stream, group and field name the system uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from zimage_queue.message import Priority

PREFIX = "zimage"
WORKER_GROUP = "workers"
OPERATOR_GROUP = "operator"
EVENTS_STREAM = f"{PREFIX}:events"
DEAD_LETTER_STREAM = f"{PREFIX}:dead-letter"
MESSAGE_FIELD = "job"
EVENT_FIELD = "event"
ERROR_FIELD = "error"
# Dead-letter entries of input no reader could parse: where it came from, what it was, why it was refused.
SOURCE_FIELD = "source"
ENTRY_FIELD = "entry"
RAW_FIELD = "raw"

# Caps: every stream has one. Job streams lose each entry when it is acked; the events stream is trimmed by age
# once every group has read past it (JobQueue.trim_events), this cap only bounds a stream nobody trims.
EVENTS_MAXLEN = 100_000
DEAD_LETTER_MAXLEN = 10_000

# Job hash fields
F_ENQUEUED = "enqueued"
F_STREAM = "stream"
F_ATTEMPTS = "attempts"
F_RESULT = "result"
F_STATE = "state"
F_WORKER = "worker"
F_CANCEL = "cancel"
# What an attempt ran on, for usage (JSON: batchImages, device), one field per attempt: "usage:<attempt>". Kept in
# the record, not the events, because the previous release's operator refuses events with fields it does not know.
F_USAGE_PREFIX = "usage:"
# The terminal event (succeeded/failed/cancelled), kept with the job so no outcome depends on the capped
# events stream: the operator resyncs unfinished ImageJobs from it.
F_FINAL = "final"
# Cluster only: the queue a reroute is moving the job to (set on the source record until the move is done).
F_MOVING = "moving"

# Highest first: the order a worker drains its streams in.
PRIORITY_ORDER: tuple[Priority, ...] = ("high", "normal", "low")


def queue_name(namespace: str, model: str) -> str:
    """A model's queue is named by its ModelDeployment: one pool of workers per namespace/name."""
    return f"{namespace}/{model}"


def stream(queue: str, priority: Priority) -> str:
    return f"{PREFIX}:q:{queue}:{priority}"


def streams(queue: str) -> list[str]:
    return [stream(queue, p) for p in PRIORITY_ORDER]


def job(uid: str) -> str:
    return f"{PREFIX}:job:{uid}"


def workers(queue: str) -> str:
    """Hash of the queue's workers: name -> "busy|idle <unix time>" (their heartbeats, for the scaler)."""
    return f"{PREFIX}:workers:{queue}"


def worker_adapters(queue: str) -> str:
    """Hash of the queue's workers: name -> the LoRA adapters it holds loaded, comma-separated (written with
    its heartbeat; entries of workers gone from ``workers`` are dropped by the reader)."""
    return f"{PREFIX}:worker-adapters:{queue}"


def bulk_job(namespace: str, name: str) -> str:
    """Hash of one bulk job (the API's jobs without an ImageJob): its metadata, spec and the status the API wrote."""
    return f"{PREFIX}:bulk:{namespace}:job:{name}"


# The bulk job hash's field holding the job's object (metadata, spec), as the API wrote it at admission.
F_BULK_OBJECT = "object"


def bulk_index(namespace: str, tenant: str) -> str:
    """Sorted set of a tenant's bulk job names by creation time (ms), trimmed by retention and count."""
    return f"{PREFIX}:bulk:{namespace}:index:{tenant}"


# -- Usage and history (zimage_history) -----------------------------------------------------------------------
# Rows on their way to PostgreSQL: the operator appends, the history writer inserts and deletes. Capped: past
# HISTORY_OUTBOX_MAXLEN rows (a long outage at full speed) the oldest go, counted by a metric.
HISTORY_OUTBOX = f"{PREFIX}:history:outbox"
HISTORY_FIELD = "row"
HISTORY_OUTBOX_MAXLEN = 2_000_000
# A tenant's usage per UTC day (hash: gpuSeconds, cost, images, attempts), for GPU-second quotas at admission;
# kept long enough to sum a calendar month.
USAGE_DAY_TTL_SECONDS = 40 * 86400
USAGE_GPU_SECONDS = "gpuSeconds"
USAGE_COST = "cost"
USAGE_IMAGES = "images"
USAGE_ATTEMPTS = "attempts"


def usage_day(tenant: str, day: str) -> str:
    """``day``: ``YYYYMMDD`` (UTC)."""
    return f"{PREFIX}:usage:{tenant}:{day}"


# Jobs that ended and the images they made, per ModelDeployment and UTC minute, for the throughput the console
# charts (GET /v1/deployments): one hash per deployment, a ring of THROUGHPUT_SLOTS slots (minute % slots), each
# "<slot>:minute" (minutes since the epoch), "<slot>:jobs" and "<slot>:images". It holds the last THROUGHPUT_SLOTS
# minutes at most, one key per deployment, gone after THROUGHPUT_TTL_SECONDS without a job.
THROUGHPUT_SLOTS = 16
THROUGHPUT_TTL_SECONDS = 3600
THROUGHPUT_MINUTE = "minute"
THROUGHPUT_JOBS = "jobs"
THROUGHPUT_IMAGES = "images"


def throughput(namespace: str, deployment: str) -> str:
    return f"{PREFIX}:throughput:{namespace}:{deployment}"


# Held by the one operator replica that runs the pool and deadline loops.
OPERATOR_LEASE = f"{PREFIX}:operator-lease"


def operator_lease(shard: str = "") -> str:
    """The lease of one operator shard's leader (its pool, deadline and resync loops); no shard: the one lease
    of an unsharded install."""
    return f"{OPERATOR_LEASE}:{shard}" if shard else OPERATOR_LEASE


def operator_group(shard: str = "") -> str:
    """The events stream's consumer group of one operator shard: every shard reads every event through its own
    group and applies those of its own jobs. No shard: the group of an unsharded install."""
    return f"{OPERATOR_GROUP}-{shard}" if shard else OPERATOR_GROUP


# -- Redis Cluster ---------------------------------------------------------------------------------------------
# On a cluster every key of one queue carries the queue's hash tag, so one queue lives on one slot and each of
# its scripts runs on one node: ``zimage:{ns/model}:q:<priority>``, ``...:job:<uid>``, ``...:events``,
# ``...:dead-letter``, ``...:workers``. A single server keeps the flat names above (so a worker of the previous
# release can share it during a rolling upgrade). docs/scaling.md, "Redis Cluster / Sentinel", has the table.

# Every queue a process has set up, so readers of the per-queue events streams find them all (cluster only).
QUEUES = f"{PREFIX}:queues"


def job_queue(uid: str) -> str:
    """Cluster only: which queue's slot holds the job's record, for the calls that know the uid alone."""
    return f"{PREFIX}:job-queue:{{{uid}}}"


@dataclass(frozen=True)
class Layout:
    """Key names per deployment: ``FLAT`` on one server (as before), ``TAGGED`` on a Redis Cluster."""

    tagged: bool

    def _q(self, queue: str) -> str:
        return f"{PREFIX}:{{{queue}}}"

    def stream(self, queue: str, priority: Priority) -> str:
        return f"{self._q(queue)}:q:{priority}" if self.tagged else stream(queue, priority)

    def streams(self, queue: str) -> list[str]:
        return [self.stream(queue, p) for p in PRIORITY_ORDER]

    def job(self, queue: str, uid: str) -> str:
        return f"{self._q(queue)}:job:{uid}" if self.tagged else job(uid)

    def workers(self, queue: str) -> str:
        return f"{self._q(queue)}:workers" if self.tagged else workers(queue)

    def worker_adapters(self, queue: str) -> str:
        return f"{self._q(queue)}:worker-adapters" if self.tagged else worker_adapters(queue)

    def events(self, queue: str) -> str:
        return f"{self._q(queue)}:events" if self.tagged else EVENTS_STREAM

    def dead_letter(self, queue: str) -> str:
        return f"{self._q(queue)}:dead-letter" if self.tagged else DEAD_LETTER_STREAM

    def queue_of(self, key: str) -> str | None:
        """The queue a tagged key belongs to (None for a flat or untagged key)."""
        if not self.tagged or "{" not in key:
            return None
        return key.partition("{")[2].partition("}")[0] or None


FLAT = Layout(tagged=False)
TAGGED = Layout(tagged=True)


# -- API key pools (remote ModelDeployment backends) -----------------------------------------------------------
# Each pool key (one API key of an external provider) has three Redis keys, all carrying the pool's hash tag on
# any deployment, so a pool lives on one slot and one script decides for all its keys:
# ``zimage:keypool:{pool}:<key id>:log`` (sorted set: lease -> start, microseconds of Redis TIME, the sliding
# window's log), ``...:live`` (sorted set: lease -> expiry, the requests in flight) and ``...:meta`` (hash: lease
# -> tokens counted for it, plus the fields below). Each has a TTL that every write extends.
KEYPOOL_TOKENS = "~tokens"  # the sum of the window's token counts
KEYPOOL_BLOCKED = "~blocked"  # rate limited until (microseconds)
KEYPOOL_BENCHED = "~benched"  # benched by the circuit breaker until (microseconds)
KEYPOOL_FAILURES = "~failures"  # consecutive failures


def keypool(pool: str, key_id: str, part: str) -> str:
    """One of a pool key's Redis keys: ``part`` is ``log``, ``live`` or ``meta``."""
    return f"{PREFIX}:keypool:{{{pool}}}:{key_id}:{part}"
