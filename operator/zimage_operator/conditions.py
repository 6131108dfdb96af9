"""Kubernetes-style conditions: a list keyed by type, changed only when something really changed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

MAX_MESSAGE = 1024


def iso(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Return the new list and whether it changed. lastTransitionTime moves only when status flips."""
    current = [dict(c) for c in (conditions or [])]
    want = "True" if status else "False"
    # Never empty: some API servers (1.20 seen) read "" in a CR status as null and reject the patch.
    message = (message or reason)[:MAX_MESSAGE]
    for c in current:
        if c.get("type") != type_:
            continue
        same = (c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration")) == (
            want,
            reason,
            message,
            generation,
        )
        if same:
            return current, False
        if c.get("status") != want:
            c["lastTransitionTime"] = iso(now)
        c.update(status=want, reason=reason, message=message)
        if generation is not None:
            c["observedGeneration"] = generation
        return current, True
    new: dict[str, Any] = {
        "type": type_,
        "status": want,
        "reason": reason,
        "message": message,
        "lastTransitionTime": iso(now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    return [*current, new], True


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
