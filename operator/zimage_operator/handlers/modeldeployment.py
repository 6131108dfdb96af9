"""Thin kopf handler for ModelDeployment: keep the pool loop's view of each object current."""

from __future__ import annotations

from typing import Any

import kopf

from zimage_operator.pools import Pool
from zimage_operator.runtime import Runtime
from zimage_operator.types import GROUP, MODELDEPLOYMENT_PLURAL, VERSION


@kopf.on.event(GROUP, VERSION, MODELDEPLOYMENT_PLURAL)
async def track(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Children are garbage-collected through their ownerReferences, so a delete only drops the pool."""
    rt: Runtime = memo.runtime
    uid = body["metadata"]["uid"]
    if event.get("type") == "DELETED":
        rt.pools.pop(uid, None)
        return
    pool = rt.pools.get(uid)
    if pool is None:
        rt.pools[uid] = Pool(body=dict(body))
        admitter = memo.get("admitter")
        if admitter is not None:  # jobs that arrived before their model are admitted now, not at the recheck
            admitter.wake(body["metadata"]["namespace"])
    else:
        pool.body = dict(body)
        pool.next_drift_check = 0.0  # a spec change is applied on the next pass
