"""Every Redis key, stream, group and field name the system uses, in one place."""

from __future__ import annotations

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
# The terminal event (succeeded/failed/cancelled), kept with the job so no outcome depends on the capped
# events stream: the operator resyncs unfinished ImageJobs from it.
F_FINAL = "final"

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


def bulk_job(namespace: str, name: str) -> str:
    """Hash of one bulk job (the API's jobs without an ImageJob): its metadata, spec and the status the API wrote."""
    return f"{PREFIX}:bulk:{namespace}:job:{name}"


def bulk_index(namespace: str, tenant: str) -> str:
    """Sorted set of a tenant's bulk job names by creation time (ms), trimmed by retention and count."""
    return f"{PREFIX}:bulk:{namespace}:index:{tenant}"


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
