"""The only module that talks to the Kubernetes API server (official client; sync, so call via to_thread)."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL, VERSION

log = logging.getLogger(__name__)
COMPONENT = "zimage-operator"


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = socket.gethostname()

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(IMAGEJOB_PLURAL, namespace, name)

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(MODELDEPLOYMENT_PLURAL, namespace, name)

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch the status subresource; False when the job is gone."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, IMAGEJOB_PLURAL, name, {"status": status}
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, IMAGEJOB_PLURAL, name, propagation_policy="Background"
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a Kubernetes Event on the object; losing one is not worth failing a transition for."""
        meta = obj["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                kind=obj.get("kind", "ImageJob"),
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=client.V1EventSource(component=COMPONENT, host=self.host),
            reporting_component=COMPONENT,
            reporting_instance=self.host,
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as e:
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)
