"""Usage and the job history: ``GET /v1/usage`` and ``DELETE /v1/history`` (the history in job listings:
``GET /v1/jobs?source=history``, in routes_jobs). Both need the history store (ZIMAGE_API_HISTORY_URL)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from zimage_api.apikeys import TENANT_PATTERN
from zimage_api.deps import App, Caller, HistoryStore
from zimage_api.errors import ApiError
from zimage_api.history import parse_time, scope
from zimage_api.schemas import HistoryErased, UsageGroupBy, UsageReport, UsageRow
from zimage_operator.conditions import iso

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["usage"])

DEFAULT_SPAN = timedelta(days=7)
MAX_SPAN = timedelta(days=400)  # the operator keeps the hourly sums 400 days by default
# Answers of these routes besides 200 and the 400, 401, 404 and 429 every /v1 route lists.
HISTORY_ANSWERS: dict[int | str, dict[str, Any]] = {
    403: {"description": "tenant names another tenant, and the key is not an admin key"},
    503: {"description": "the history store (PostgreSQL) is unreachable"},
}
TenantParam = Annotated[
    str | None,
    Query(
        max_length=63,
        pattern=TENANT_PATTERN.pattern,
        description="Only this tenant's. An admin key may name any tenant (left out: every tenant); another key "
        "only its own.",
    ),
]


def time_range(start: str | None, end: str | None, now: datetime) -> tuple[datetime, datetime]:
    """``from`` and ``to`` as given (ISO 8601), or the 7 days up to now; ``from`` before ``to``, at most 400 days."""
    to = parse_time(end, "to") or now
    try:
        since = parse_time(start, "from") or to - DEFAULT_SPAN
    except OverflowError:  # `to` in the first week of year 1
        raise ApiError(400, "to: too early", param="to", code="invalid_value") from None
    if since >= to:
        raise ApiError(
            400, f"from: must be before to (from {iso(since)}, to {iso(to)})", param="from", code="invalid_value"
        )
    if to - since > MAX_SPAN:
        raise ApiError(
            400,
            f"from: at most {MAX_SPAN.days} days before to (from {iso(since)}, to {iso(to)}: {(to - since).days} days)",
            param="from",
            code="invalid_value",
        )
    return since, to


@router.get("/usage", response_model=UsageReport, response_model_exclude_none=True, responses=HISTORY_ANSWERS)
async def usage(
    caller: Caller,
    history: HistoryStore,
    from_: Annotated[
        str | None,
        Query(
            alias="from",
            max_length=64,
            description="ISO 8601 date (its midnight, UTC) or date-time; default: 7 days before to.",
        ),
    ] = None,
    to: Annotated[
        str | None, Query(max_length=64, description="ISO 8601 date or date-time, excluded; default: now.")
    ] = None,
    group_by: UsageGroupBy = "tenant",
    tenant: TenantParam = None,
) -> UsageReport:
    """GPU-seconds, cost, images, jobs and attempts between ``from`` and ``to``, per tenant, model (the
    ModelDeployment that ran the attempts) or UTC day. Read from the hourly sums: whole UTC hours, the hour
    ``from`` falls in counted, ``to``'s not. A key sees its own tenant's usage; an admin key every tenant's."""
    who = scope(caller, tenant)
    start, end = time_range(from_, to, datetime.now(UTC))
    rows, currency = await history.usage(start, end, group_by, who)
    return UsageReport(
        from_=iso(start),
        to=iso(end),
        group_by=group_by,
        data=[UsageRow.model_validate(r) for r in rows],
        currency=currency,
    )


@router.delete("/history", response_model=HistoryErased, responses=HISTORY_ANSWERS)
async def erase_history(caller: Caller, app: App, history: HistoryStore, tenant: TenantParam = None) -> HistoryErased:
    """Erase a tenant's job history: its rows (prompts included) and the images they name in this API's storage.
    A key erases its own tenant's; an admin key must name the tenant. The hourly usage sums (billing) stay: they
    hold no prompt or image. Rows still on their way (in the operator's outbox while PostgreSQL was down) arrive
    later: send it again then. ``complete: false``: time ran out first, send it again for the rest."""
    if caller.admin and tenant is None:
        raise ApiError(
            400, "tenant: required with an admin key (whose history to erase)", param="tenant", code="invalid_value"
        )
    who = scope(caller, tenant) or caller.tenant

    def delete_images(uris: list[str]) -> int:
        # Only the tenant's own objects, whatever a row names.
        return app.images.delete([u for u in uris if app.images.owns(u, who)])

    jobs, images, complete = await history.erase(who, delete_images)
    log.info(
        "history of tenant %s erased by key %s: %d rows, %d images%s",
        who,
        caller.key_id,
        jobs,
        images,
        "" if complete else " (more to do)",
    )
    return HistoryErased(tenant=who, deleted_jobs=jobs, deleted_images=images, complete=complete)
