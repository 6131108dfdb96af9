"""Where API jobs are recorded: ImageJob custom resources, or (local mode) an in-process stand-in.

Both stores hand out Kubernetes-shaped dicts (``metadata``/``spec``/``status``), so everything above them is
written once. The API labels what it creates with its tenant and model; ``kubectl get ij`` shows API jobs.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from zimage_operator.conditions import iso
from zimage_operator.types import API_VERSION, TENANT_LABEL

__all__ = ["TENANT_LABEL", "JobExists", "JobStore", "MemoryJobStore", "WorkflowStore", "merge_patch"]

MODEL_LABEL = "zimage.dev/model"
REQUEST_HASH_ANNOTATION = "zimage.dev/request-sha256"


class JobExists(Exception):
    """A job of that name exists already (an Idempotency-Key retry)."""


class JobStore(Protocol):
    namespace: str

    def create_job(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        """Create and return the job; raise JobExists when the name is taken."""
        ...

    def get_job(self, name: str) -> dict[str, Any] | None: ...

    def list_jobs(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first is not promised (Kubernetes lists by name); the token pages on."""
        ...

    def patch_job_status(self, name: str, status: dict[str, Any], resource_version: str | None = None) -> bool:
        """Merge ``status`` in; False when the job is gone. With ``resource_version`` only onto that version of
        the object, else StaleVersion."""
        ...

    def get_model(self, name: str) -> dict[str, Any] | None: ...

    def list_models(self) -> list[dict[str, Any]]: ...

    def ready(self) -> None:
        """Raise when the backing store cannot be reached."""
        ...


@runtime_checkable
class WorkflowStore(Protocol):
    """ImageWorkflows, beside the jobs (both stores; not the bulk store). Same dict shapes as the jobs."""

    namespace: str

    def create_workflow(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        """Create and return the workflow; raise JobExists when the name is taken."""
        ...

    def get_workflow(self, name: str) -> dict[str, Any] | None: ...

    def list_workflows(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]: ...

    def patch_workflow(self, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """A merge patch on the object (``{"spec": {"cancel": true}}``); the patched workflow, None when gone."""
        ...


class StaleVersion(Exception):
    """The job changed between our read and our write."""


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch (RFC 7386), as the API server applies it to status."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge_patch(target[k], v)
        else:
            target[k] = v


def new_job(
    namespace: str,
    name: str,
    spec: dict[str, Any],
    labels: dict[str, str],
    annotations: dict[str, str],
    now: datetime,
    kind: str = "ImageJob",
) -> dict[str, Any]:
    """A new job (or ``kind``) as the API server would hand it back (a fresh uid, generation 1), without a status."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "creationTimestamp": iso(now),
            "labels": dict(labels),
            "annotations": dict(annotations),
        },
        "spec": dict(spec),
    }


class MemoryJobStore:
    """Local mode's store: jobs in a dict, models declared up front. Lost when the process ends."""

    def __init__(self, namespace: str, models: list[dict[str, Any]]) -> None:
        self.namespace = namespace
        self._models = {m["metadata"]["name"]: m for m in models}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._names: dict[str, str] = {}  # uid -> name: worker events carry the uid
        self._workflows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def create_job(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        with self._lock:
            if name in self._jobs:
                raise JobExists(name)
            obj = {**new_job(self.namespace, name, spec, labels, annotations, datetime.now(UTC)), "status": {}}
            self._jobs[name] = obj
            self._names[obj["metadata"]["uid"]] = name
            return _copy(obj)

    def get_job(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self._jobs.get(name)
            return _copy(obj) if obj else None

    def update_status(self, uid: str, decide: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Apply ``decide(status) -> patch`` to the job with ``uid``, under the lock (no copies: hot path)."""
        with self._lock:
            obj = self._jobs.get(self._names.get(uid, ""))
            if obj is None:
                return
            patch = decide(obj["status"])
            if patch:
                merge_patch(obj["status"], patch)

    def list_jobs(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self._lock:
            names = sorted(
                n
                for n, o in self._jobs.items()
                if all(o["metadata"]["labels"].get(k) == v for k, v in labels.items())
                and (continue_token is None or n > continue_token)
            )
            page = [_copy(self._jobs[n]) for n in names[:limit]]
        return page, (names[limit - 1] if len(names) > limit else None)

    def patch_job_status(self, name: str, status: dict[str, Any], resource_version: str | None = None) -> bool:
        with self._lock:
            obj = self._jobs.get(name)
            if obj is None:
                return False
            current = obj["metadata"].get("resourceVersion")
            if resource_version and current and current != resource_version:
                raise StaleVersion(f"job {name} changed since version {resource_version}")
            merge_patch(obj["status"], status)
            return True

    # -- workflows (local mode runs them in-process: ``zimage_api.local.LocalWorkflows``) ------------------
    def create_workflow(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        with self._lock:
            if name in self._workflows:
                raise JobExists(name)
            now = datetime.now(UTC)
            obj = {**new_job(self.namespace, name, spec, labels, annotations, now, "ImageWorkflow"), "status": {}}
            self._workflows[name] = obj
            return _copy(obj)

    def get_workflow(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self._workflows.get(name)
            return _copy(obj) if obj else None

    def list_workflows(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self._lock:
            names = sorted(
                n
                for n, o in self._workflows.items()
                if all(o["metadata"]["labels"].get(k) == v for k, v in labels.items())
                and (continue_token is None or n > continue_token)
            )
            page = [_copy(self._workflows[n]) for n in names[:limit]]
        return page, (names[limit - 1] if len(names) > limit else None)

    def patch_workflow(self, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            obj = self._workflows.get(name)
            if obj is None:
                return None
            merge_patch(obj, patch)
            if "spec" in patch:
                obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            return _copy(obj)

    def set_workflow_status(self, name: str, status: dict[str, Any]) -> None:
        """Replace the workflow's status (the in-process planner's write)."""
        with self._lock:
            obj = self._workflows.get(name)
            if obj is not None:
                obj["status"] = copy.deepcopy(status)

    def unfinished_workflows(self, terminal: frozenset[str]) -> list[dict[str, Any]]:
        with self._lock:
            return [_copy(o) for o in self._workflows.values() if (o.get("status") or {}).get("phase") not in terminal]

    def jobs_labelled(self, labels: dict[str, str]) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                n: _copy(o)
                for n, o in self._jobs.items()
                if all(o["metadata"]["labels"].get(k) == v for k, v in labels.items())
            }

    def get_model(self, name: str) -> dict[str, Any] | None:
        return self._models.get(name)

    def list_models(self) -> list[dict[str, Any]]:
        return list(self._models.values())

    def ready(self) -> None:
        return None


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(obj)
