"""Reading stream entries: decode them, and move the ones no reader can parse out of the way.

An entry that does not parse can never succeed, and a reader that stops on it stalls every entry behind it
(a pending entry is read first on every pass). So it goes to the dead-letter stream with the reason, is acked
(and deleted from a job stream), counted, and logged once; the reader carries on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from zimage_queue import keys
from zimage_queue.clients import retrying
from zimage_queue.metrics import POISON_ENTRIES

log = logging.getLogger(__name__)

MAX_RAW_CHARS = 16_384


def text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def decoded(fields: dict[Any, Any] | None) -> dict[str, str]:
    return {text(k): text(v) for k, v in (fields or {}).items()}


@dataclass(frozen=True)
class Poisoned:
    """A dead-letter entry for input that did not parse."""

    source: str
    entry_id: str
    raw: str
    error: str


def quarantine(
    r: Any,
    *,
    stream: str,
    group: str,
    entry_id: str,
    fields: dict[str, str],
    error: str,
    kind: str,
    delete: bool,
    dead_letter: str = keys.DEAD_LETTER_STREAM,
) -> None:
    """Dead-letter, ack (and for a job stream delete) one entry, in one transaction. On a cluster
    ``dead_letter`` is the stream's queue's own (the same slot)."""
    raw = json.dumps(fields, ensure_ascii=True)[:MAX_RAW_CHARS]

    def write() -> None:
        pipe = r.pipeline(transaction=True)
        pipe.xadd(
            dead_letter,
            {
                keys.SOURCE_FIELD: stream,
                keys.ENTRY_FIELD: entry_id,
                keys.RAW_FIELD: raw,
                keys.ERROR_FIELD: error[:2000],
            },
            maxlen=keys.DEAD_LETTER_MAXLEN,
            approximate=True,
        )
        pipe.xack(stream, group, entry_id)
        if delete:
            pipe.xdel(stream, entry_id)
        pipe.execute()

    retrying(r, write)
    POISON_ENTRIES.labels(stream=kind).inc()
    # One line per entry, ever: it is acked, so no reader sees it again.
    log.error("moved unreadable %s entry %s of %s to %s: %s", kind, entry_id, stream, dead_letter, error)


def error_text(e: Exception) -> str:
    """A validation error in one line, without pydantic's documentation links."""
    lines = [line for line in str(e).splitlines() if "errors.pydantic.dev" not in line]
    return "; ".join(line.strip() for line in lines if line.strip())[:2000]
