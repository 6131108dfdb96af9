"""ImageJobs and ModelDeployments on the Kubernetes API server (official client; sync: call from a thread)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from zimage_api.store import JobExists, StaleVersion
from zimage_operator.k8s import load_configuration, with_timeouts
from zimage_operator.types import API_VERSION, GROUP, IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL, VERSION
from zimage_operator.workflow_types import IMAGEWORKFLOW_PLURAL

# A ModelDeployment read for one submit serves the next ones this long: a burst of bulk jobs costs the API
# server one read, not one per job. A missing model is asked again every time (it may be created any moment).
MODEL_CACHE_SECONDS = 5.0


def load_client() -> client.ApiClient:
    return client.ApiClient(load_configuration())


class KubeJobStore:
    def __init__(
        self,
        namespace: str,
        api_client: client.ApiClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(with_timeouts(api_client or load_client()))
        self.clock = clock
        self._models: dict[str, tuple[float, dict[str, Any]]] = {}

    def _create(
        self,
        kind: str,
        plural: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str],
        annotations: dict[str, str],
    ) -> dict[str, Any]:
        body = {
            "apiVersion": API_VERSION,
            "kind": kind,
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": spec,
        }
        try:
            obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, body
            )
        except ApiException as e:
            if e.status == 409:
                raise JobExists(name) from e
            raise
        return obj

    def create_job(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        return self._create("ImageJob", IMAGEJOB_PLURAL, name, spec, labels, annotations)

    def _get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def get_job(self, name: str) -> dict[str, Any] | None:
        return self._get(IMAGEJOB_PLURAL, name)

    def list_jobs(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        return self._list(IMAGEJOB_PLURAL, labels, limit, continue_token)

    def _list(
        self, plural: str, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        kwargs: dict[str, Any] = {"label_selector": selector, "limit": limit}
        if continue_token:
            kwargs["_continue"] = continue_token
        try:
            out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, **kwargs)
        except ApiException as e:
            if e.status == 410:  # the continue token expired: the client starts over
                raise ValueError("page token expired; list again from the start") from e
            raise
        return list(out.get("items", [])), (out.get("metadata") or {}).get("continue") or None

    def patch_job_status(self, name: str, status: dict[str, Any], resource_version: str | None = None) -> bool:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, IMAGEJOB_PLURAL, name, body
            )
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status == 409:
                raise StaleVersion(f"job {name} changed since version {resource_version}") from e
            raise
        return True

    # -- workflows ----------------------------------------------------------------------------------------
    def create_workflow(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        try:
            return self._create("ImageWorkflow", IMAGEWORKFLOW_PLURAL, name, spec, labels, annotations)
        except ApiException as e:
            if e.status == 422:  # the CRD's schema or CEL rules refused it: the caller's mistake
                raise ValueError(_refusal(e)) from e
            raise

    def get_workflow(self, name: str) -> dict[str, Any] | None:
        return self._get(IMAGEWORKFLOW_PLURAL, name)

    def list_workflows(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        return self._list(IMAGEWORKFLOW_PLURAL, labels, limit, continue_token)

    def patch_workflow(self, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """A JSON merge patch (the client sends dicts as application/merge-patch+json)."""
        try:
            obj: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, IMAGEWORKFLOW_PLURAL, name, patch
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def get_model(self, name: str) -> dict[str, Any] | None:
        now = self.clock()
        cached = self._models.get(name)
        if cached is not None and now - cached[0] < MODEL_CACHE_SECONDS:
            return cached[1]
        model = self._get(MODELDEPLOYMENT_PLURAL, name)
        if model is None:
            self._models.pop(name, None)
        else:
            if len(self._models) > 1000:  # models are few; a flood of made-up names must not grow this
                self._models.clear()
            self._models[name] = (now, model)
        return model

    def list_models(self) -> list[dict[str, Any]]:
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, MODELDEPLOYMENT_PLURAL)
        return list(out.get("items", []))

    def ready(self) -> None:
        self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, MODELDEPLOYMENT_PLURAL, limit=1)


def _refusal(e: ApiException) -> str:
    """The API server's reason for refusing an object (its Status message)."""
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except (TypeError, ValueError):
        return str(e.reason)
