"""GPU-second budgets per tenant (per UTC day and per calendar month), next to the concurrent-job quota.

Read at admission (the API's, and the operator's for ImageJobs made with kubectl) from the daily usage counters
the operator keeps in Redis (``outbox.Outbox.put``), so a PostgreSQL outage never blocks admission. A job that
starts under budget finishes even if it goes over: the budget refuses the next one.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from zimage_history.outbox import usage_since
from zimage_queue import keys

DEFAULT_TENANT = "*"  # the budget of every tenant not named


class TenantQuota(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    gpu_seconds_per_day: float | None = Field(None, alias="gpuSecondsPerDay", ge=0)
    gpu_seconds_per_month: float | None = Field(None, alias="gpuSecondsPerMonth", ge=0)


def quota_for(quotas: dict[str, TenantQuota], tenant: str) -> TenantQuota | None:
    return quotas.get(tenant) or quotas.get(DEFAULT_TENANT)


def month_days(now: datetime) -> list[str]:
    return [f"{now.year:04d}{now.month:02d}{d:02d}" for d in range(1, now.day + 1)]


def verdict(quota: TenantQuota, today: float, month: float, now: datetime) -> tuple[str, float] | None:
    """Why the tenant is over budget and the seconds until the budget renews; None: within it (pure)."""
    if quota.gpu_seconds_per_day is not None and today >= quota.gpu_seconds_per_day:
        tomorrow = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        return (
            f"used {today:.0f} of its {quota.gpu_seconds_per_day:.0f} GPU-seconds for today (UTC)",
            (tomorrow - now).total_seconds(),
        )
    if quota.gpu_seconds_per_month is not None and month >= quota.gpu_seconds_per_month:
        last = calendar.monthrange(now.year, now.month)[1]
        renews = datetime(now.year, now.month, last, tzinfo=UTC) + timedelta(days=1)
        return (
            f"used {month:.0f} of its {quota.gpu_seconds_per_month:.0f} GPU-seconds for this month",
            (renews - now).total_seconds(),
        )
    return None


def over_budget(r: Any, tenant: str, quota: TenantQuota | None, now: datetime) -> tuple[str, float] | None:
    """``verdict`` on the tenant's counters in Redis."""
    if quota is None or (quota.gpu_seconds_per_day is None and quota.gpu_seconds_per_month is None):
        return None
    days = month_days(now) if quota.gpu_seconds_per_month is not None else [month_days(now)[-1]]
    today = usage_since(r, tenant, days[-1:])[keys.USAGE_GPU_SECONDS]
    month = usage_since(r, tenant, days)[keys.USAGE_GPU_SECONDS] if len(days) > 1 else today
    found = verdict(quota, today, month, now)
    return (f"tenant {tenant!r} {found[0]}", found[1]) if found else None
