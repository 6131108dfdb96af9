"""GPU-second budgets: the verdict (pure), and the operator's admission of a job made with kubectl."""

from __future__ import annotations

from datetime import UTC, datetime

from zimage_history.quotas import TenantQuota, month_days, quota_for, verdict
from zimage_operator import reconcile
from zimage_operator.types import Reason

NOW = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
DAILY = TenantQuota.model_validate({"gpuSecondsPerDay": 3600, "gpuSecondsPerMonth": 36000})


def test_a_day_budget_renews_at_utc_midnight_and_a_month_budget_on_the_first() -> None:
    assert verdict(DAILY, today=3599, month=3599, now=NOW) is None
    why, renews = verdict(DAILY, today=3600, month=3600, now=NOW) or ("", 0.0)
    assert "3600 of its 3600 GPU-seconds for today" in why and renews == 6 * 3600
    why, renews = verdict(DAILY, today=10, month=36000, now=NOW) or ("", 0.0)
    assert "for this month" in why and renews == (24 * 24 + 6) * 3600  # until 2027-01-01T00:00Z
    assert verdict(TenantQuota(), today=1e9, month=1e9, now=NOW) is None  # no budget: never over


def test_named_tenants_first_then_everyone_else() -> None:
    quotas = {"team-a": DAILY, "*": TenantQuota.model_validate({"gpuSecondsPerDay": 60})}
    assert quota_for(quotas, "team-a") is DAILY
    other = quota_for(quotas, "team-b")
    assert other is not None and other.gpu_seconds_per_day == 60
    assert quota_for({}, "team-a") is None
    assert month_days(NOW)[0] == "20261201" and month_days(NOW)[-1] == "20261207" and len(month_days(NOW)) == 7


def test_a_job_over_budget_fails_at_admission_unless_it_was_admitted_already() -> None:
    meta = {"name": "fox", "namespace": "team-a", "uid": "u1", "generation": 1}
    spec = {"model": "turbo", "prompt": "a fox", "width": 512, "height": 512}
    model = {"metadata": {"name": "turbo"}, "spec": {"model": {"variant": "turbo"}}}
    over = "tenant 'team-a' used 3600 of its 3600 GPU-seconds for today (UTC)"
    failed = reconcile.admit(spec=spec, status={}, meta=meta, model=model, now=NOW, over_quota=over)
    assert failed.action == "fail" and failed.patch["phase"] == "Failed"
    [cond] = [c for c in failed.patch["conditions"] if c["type"] == "Failed"]
    assert cond["reason"] == Reason.GPU_QUOTA_EXCEEDED and over in cond["message"]
    queued = {"phase": "Queued", "seed": 1}
    resumed = reconcile.admit(spec=spec, status=queued, meta=meta, model=model, now=NOW, over_quota=over)
    assert resumed.action == "enqueue"
    assert reconcile.admit(spec=spec, status={}, meta=meta, model=model, now=NOW).action == "enqueue"
