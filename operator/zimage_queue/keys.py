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

# Job hash fields
F_ENQUEUED = "enqueued"
F_STREAM = "stream"
F_ATTEMPTS = "attempts"
F_RESULT = "result"
F_STATE = "state"
F_WORKER = "worker"
F_CANCEL = "cancel"

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


# Held by the one operator replica that runs the pool and deadline loops.
OPERATOR_LEASE = f"{PREFIX}:operator-lease"
