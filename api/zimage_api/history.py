"""The job history store (``zimage_history``, PostgreSQL; the operator writes it) as the API reads it: usage,
finished jobs past their TTL, and a tenant's erasure.

Every call runs on a thread (the driver blocks) with short timeouts. PostgreSQL unreachable is a 503
``history_unavailable``, never a user error; no store configured (``ZIMAGE_API_HISTORY_URL`` empty) is a 404
``history_disabled``. Nothing else in the API waits for it: submitting and following jobs never do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from zimage_api.apikeys import Principal
from zimage_api.errors import ApiError
from zimage_api.redis_store import BULK_LABEL
from zimage_api.store import MODEL_LABEL, TENANT_LABEL
from zimage_history import db, queries
from zimage_history.schema import job_history
from zimage_operator.conditions import iso

log = logging.getLogger(__name__)
T = TypeVar("T")

Source = Literal["live", "history"]
HISTORY_PHASES = {"Succeeded": "succeeded", "Failed": "failed", "Cancelled": "cancelled"}
PHASE_OF = {outcome: phase for phase, outcome in HISTORY_PHASES.items()}
TOKEN_PREFIX = "history."  # a history page token: this and the last id listed
CONNECT_TIMEOUT_SECONDS = 3  # a request waits at most about this for a PostgreSQL that does not answer
STATEMENT_TIMEOUT_MS = 15_000
ERASE_SECONDS = 50.0  # one DELETE /v1/history works this long at most (then ``complete: false``: call again)
DISABLED_MESSAGE = "no job history on this API: set ZIMAGE_API_HISTORY_URL (the operator's history store)"


def disabled() -> ApiError:
    return ApiError(404, DISABLED_MESSAGE, code="history_disabled")


def scope(caller: Principal, tenant: str | None) -> str | None:
    """Whose usage and history the caller may read: an admin key everyone's (None) or ``tenant``'s; any other key
    only its own tenant's, and naming another tenant is a 403."""
    if caller.admin:
        return tenant
    if tenant is not None and tenant != caller.tenant:
        raise ApiError(
            403,
            f"tenant: this API key may read its own tenant's ({caller.tenant!r}) usage and history only",
            param="tenant",
            code="forbidden",
        )
    return caller.tenant


def parse_time(value: str | None, param: str) -> datetime | None:
    """An ISO 8601 date (its midnight, UTC) or date-time (UTC when it names no offset); 400 otherwise."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)  # a date alone is its midnight
    except ValueError:
        raise ApiError(
            400,
            f"{param}: not an ISO 8601 date or date-time (2025-01-31, 2025-01-31T12:00:00Z): {value!r}",
            param=param,
            code="invalid_value",
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def before_id_of(token: str | None) -> int | None:
    if token is None:
        return None
    last = token.removeprefix(TOKEN_PREFIX)
    if not token.startswith(TOKEN_PREFIX) or not last.isdigit() or len(last) > 19:
        raise ApiError(400, "page_token: not a token of a history list", param="page_token", code="invalid_page_token")
    return int(last)


def _iso(value: datetime | None) -> str | None:
    return iso(value) if value is not None else None


def history_job(row: dict[str, Any]) -> dict[str, Any]:
    """A ``job_history`` row as the Kubernetes-shaped job the views take (``views.job_view``): its phase from the
    outcome, its status from the row. ``spec`` holds what the row keeps of the request."""
    phase = PHASE_OF.get(row["outcome"], "Failed")
    labels = {TENANT_LABEL: row["tenant"], MODEL_LABEL: row["model"]}
    if row.get("bulk"):
        labels[BULK_LABEL] = "true"
    spec = {
        "model": row["model"],
        "task": row.get("task"),
        "prompt": row.get("prompt"),
        "width": row.get("width"),
        "height": row.get("height"),
        "numImages": row.get("num_images"),
        "seed": row.get("seed"),
    }
    status = {
        "phase": phase,
        "conditions": [{"type": phase, "status": "True", "reason": row.get("reason") or phase}],
        "attempts": row.get("attempt"),
        "worker": row.get("worker"),
        "seed": row.get("seed"),
        "steps": row.get("steps"),
        "queuedAt": _iso(row.get("queued_at")),
        "startedAt": _iso(row.get("started_at")),
        "finishedAt": _iso(row.get("finished_at")),
        "queueSeconds": row.get("queue_seconds"),
        "runSeconds": row.get("run_seconds"),
        "results": list(row.get("results") or []),
        "text": row.get("text"),
        "routedTo": row["deployment"] if row.get("deployment") not in (None, row["model"]) else None,
        "progress": {"step": row.get("steps") or 0, "totalSteps": row.get("steps") or 0}
        if phase == "Succeeded"
        else {},
        "gpuSeconds": row.get("gpu_seconds"),
        "cost": row.get("cost"),
        "currency": row.get("currency"),
    }
    return {
        "metadata": {
            "name": row["name"],
            "namespace": row["namespace"],
            "uid": row["uid"],
            "labels": labels,
            "creationTimestamp": _iso(row.get("queued_at")),  # the history keeps no creation time; admission
        },
        "spec": {k: v for k, v in spec.items() if v is not None},
        "status": {k: v for k, v in status.items() if v is not None},
    }


def install_currency(conn: Connection) -> str | None:
    """The currency of the newest row (one currency per install, ``spec.cost.currency``); None without rows."""
    found = conn.execute(
        select(job_history.c.currency)
        .where(job_history.c.currency.is_not(None))
        .order_by(job_history.c.id.desc())
        .limit(1)
    ).scalar()
    return str(found) if found else None


class History:
    """The store, through a small pool of connections with short timeouts (``zimage_history.db.connect``)."""

    def __init__(self, url: str, password: str = "", namespace: str = "default") -> None:
        self.engine = db.connect(
            url,
            password or None,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            statement_timeout_ms=STATEMENT_TIMEOUT_MS,
        )
        self.namespace = namespace  # the API's jobs: those of its namespace

    def close(self) -> None:
        self.engine.dispose()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread, PostgreSQL's failures as 503 ``history_unavailable``."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (OperationalError, InterfaceError, PoolTimeout) as e:
            log.warning("history store unreachable: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise ApiError(
                503, "the job history store (PostgreSQL) is unreachable; retry later", code="history_unavailable"
            ) from e
        except ProgrammingError as e:
            if type(e.orig).__name__ != "UndefinedTable":
                raise
            raise ApiError(
                503,
                "the job history store has no tables yet (the operator creates them when it starts); retry later",
                code="history_unavailable",
            ) from e

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            return fn(conn)

    # -- what the routes ask ----------------------------------------------------------------------------------
    async def usage(
        self, start: datetime, end: datetime, group_by: queries.GroupBy, tenant: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        def read(conn: Connection) -> tuple[list[dict[str, Any]], str | None]:
            return queries.usage(conn, start, end, group_by, tenant), install_currency(conn)

        return await self.call(self._read, read)

    async def list_jobs(
        self,
        tenant: str | None,
        *,
        model: str | None,
        outcome: str | None,
        since: datetime | None,
        until: datetime | None,
        text: str | None,
        limit: int,
        before_id: int | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of finished jobs, newest first, and the token of the next page (None: the last page)."""

        def read(conn: Connection) -> list[dict[str, Any]]:
            return queries.list_jobs(
                conn,
                tenant=tenant,
                namespace=self.namespace,
                model=model,
                outcome=outcome,
                since=since,
                until=until,
                text=text,
                limit=limit + 1,
                before_id=before_id,
            )

        rows = await self.call(self._read, read)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, f"{TOKEN_PREFIX}{rows[-1]['id']}" if more else None

    async def get_job(self, name: str, tenant: str | None) -> dict[str, Any] | None:
        return await self.call(self._read, lambda conn: queries.get_job(conn, self.namespace, name, tenant))

    async def erase(self, tenant: str, delete_images: Callable[[list[str]], int]) -> tuple[int, int, bool]:
        """Delete the tenant's rows a batch per transaction, each batch's images before it commits (an image that
        cannot be deleted keeps its row, so a retry finds it again). (rows, images, complete): ``complete`` is
        False when the time budget ran out first."""

        def erase() -> tuple[int, int, bool]:
            rows = images = 0
            deadline = time.monotonic() + ERASE_SECONDS
            while True:
                with self.engine.begin() as conn:
                    n, uris = queries.erase_some(conn, tenant)
                    images += delete_images(sorted(set(uris)))
                rows += n
                if n < queries.ERASE_BATCH:
                    return rows, images, True
                if time.monotonic() > deadline:
                    return rows, images, False

        return await self.call(erase)
