"""The Redis queue contract shared by the operator, the API and the worker.

Nothing here imports kopf, kubernetes or torch: every process that touches the queue can import it.
"""

from zimage_queue.message import (
    DEFAULT_MAX_RETRIES,
    EventType,
    GenerationParams,
    JobEvent,
    JobMessage,
    OutputFormat,
    Priority,
    ResultImage,
    Task,
)
from zimage_queue.queue import BeginOutcome, Delivery, EnqueueResult, JobQueue, QueueStats

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "BeginOutcome",
    "Delivery",
    "EnqueueResult",
    "EventType",
    "GenerationParams",
    "JobEvent",
    "JobMessage",
    "JobQueue",
    "OutputFormat",
    "Priority",
    "QueueStats",
    "ResultImage",
    "Task",
]
