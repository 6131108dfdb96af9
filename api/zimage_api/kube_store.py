"""ImageJobs and ModelDeployments on the Kubernetes API server (official client; sync: call from a thread)."""

from __future__ import annotations

from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from zimage_api.store import JobExists, StaleVersion
from zimage_operator.k8s import with_timeouts
from zimage_operator.types import API_VERSION, GROUP, IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL, VERSION


def load_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubeJobStore:
    def __init__(self, namespace: str, api_client: client.ApiClient | None = None) -> None:
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(with_timeouts(api_client or load_client()))

    def create_job(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        body = {
            "apiVersion": API_VERSION,
            "kind": "ImageJob",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": spec,
        }
        try:
            obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, IMAGEJOB_PLURAL, body
            )
        except ApiException as e:
            if e.status == 409:
                raise JobExists(name) from e
            raise
        return obj

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
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        kwargs: dict[str, Any] = {"label_selector": selector, "limit": limit}
        if continue_token:
            kwargs["_continue"] = continue_token
        try:
            out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, IMAGEJOB_PLURAL, **kwargs)
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

    def get_model(self, name: str) -> dict[str, Any] | None:
        return self._get(MODELDEPLOYMENT_PLURAL, name)

    def list_models(self) -> list[dict[str, Any]]:
        out = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, MODELDEPLOYMENT_PLURAL)
        return list(out.get("items", []))

    def ready(self) -> None:
        self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, MODELDEPLOYMENT_PLURAL, limit=1)
