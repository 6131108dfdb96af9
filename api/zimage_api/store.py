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
from typing import Any, Protocol

from zimage_operator.conditions import iso
from zimage_operator.types import API_VERSION, TENANT_LABEL

__all__ = ["TENANT_LABEL", "JobExists", "JobStore", "MemoryJobStore", "merge_patch"]

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
) -> dict[str, Any]:
    """A new job as the API server would hand it back (a fresh uid, generation 1), without a status."""
    return {
        "apiVersion": API_VERSION,
        "kind": "ImageJob",
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

    def get_model(self, name: str) -> dict[str, Any] | None:
        return self._models.get(name)

    def list_models(self) -> list[dict[str, Any]]:
        return list(self._models.values())

    def ready(self) -> None:
        return None


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(obj)
