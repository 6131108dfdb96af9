"""Thin kopf handler for ImageWorkflow: every watch event goes into the workflow book; the workflow loop
(``zimage_operator.workflows``) plans and acts. No finalizer: deleting a workflow deletes its step jobs through their
owner references, and the ImageJob watch cancels their queued work."""

from __future__ import annotations

from typing import Any

import kopf

from zimage_operator.types import GROUP, VERSION
from zimage_operator.workflow_types import IMAGEWORKFLOW_PLURAL
from zimage_operator.workflows import WorkflowBook


@kopf.on.event(GROUP, VERSION, IMAGEWORKFLOW_PLURAL)
async def track_workflow(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    book: WorkflowBook | None = memo.get("workflows")
    if book is not None:
        book.observe_workflow(dict(body), deleted=event.get("type") == "DELETED")
