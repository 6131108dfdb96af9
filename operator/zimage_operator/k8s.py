"""The only module that talks to the Kubernetes API server (official client; sync, so call via to_thread)."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL, VERSION

log = logging.getLogger(__name__)
# policy/v1 PodDisruptionBudget is GA since Kubernetes 1.21; v1beta1 serves the fields we set before that.
_OLDER_VERSIONS = {("policy/v1", "PodDisruptionBudget"): "policy/v1beta1"}
# Spec fields the older version does not have: the server drops them, so they are neither sent nor compared.
_NEWER_SPEC_FIELDS = {("policy/v1", "PodDisruptionBudget"): ("unhealthyPodEvictionPolicy",)}
COMPONENT = "zimage-operator"


# Every call the official client makes: a dead connection fails within these instead of hanging a loop.
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30.0


def with_timeouts(api_client: client.ApiClient) -> client.ApiClient:
    """Default connect/read timeouts for every request of ``api_client``.

    The client passes ``timeout=None`` to urllib3 when a call names no ``_request_timeout``, which overrides any
    pool default, so the default is filled in where each request is made.
    """
    rest = api_client.rest_client
    if getattr(rest, "_zimage_timeouts", False):
        return api_client
    plain = rest.request

    def request(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        timeout = _request_timeout or (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
        return plain(*args, _request_timeout=timeout, **kwargs)

    rest.request = request
    rest._zimage_timeouts = True
    return api_client


class StatusConflict(Exception):
    """The object changed between our read and our write."""


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api_client = with_timeouts(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = socket.gethostname()
        self._dynamic: DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}

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

    def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        """kopf's peering object (KopfPeering in ``namespace``, or the cluster-wide ClusterKopfPeering)."""
        try:
            if namespace is None:
                obj: dict[str, Any] = self.custom.get_cluster_custom_object(
                    "kopf.dev", "v1", "clusterkopfpeerings", name
                )
            else:
                obj = self.custom.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", name)
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> bool:
        """Merge-patch the status subresource; False when the object is gone.

        With ``resource_version`` the patch applies only to that version of the object, else StatusConflict.
        """
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, body)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status == 409:
                raise StatusConflict(f"{plural} {namespace}/{name} changed since version {resource_version}") from e
            raise

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        return self._patch_status(MODELDEPLOYMENT_PLURAL, namespace, name, status)

    def patch_job_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> bool:
        return self._patch_status(IMAGEJOB_PLURAL, namespace, name, status, resource_version)

    # -- owned children (any kind, through the dynamic client) ---------------------------------------------
    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            if self._dynamic is None:
                self._dynamic = DynamicClient(self.api_client)
            try:
                self._resources[key] = self._dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                older = _OLDER_VERSIONS.get(key)
                if older is None:
                    raise
                # Same fields under the older group version on clusters before it went GA.
                self._resources[key] = self._dynamic.resources.get(api_version=older, kind=kind)
        return self._resources[key]

    def as_served(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` as this cluster stores it: without the fields its (older) served version does not know."""
        key = (obj["apiVersion"], obj["kind"])
        dropped = _NEWER_SPEC_FIELDS.get(key, ())
        if not dropped or self._resource(*key).group_version == obj["apiVersion"]:
            return obj
        return {**obj, "spec": {k: v for k, v in (obj.get("spec") or {}).items() if k not in dropped}}

    def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create_object(self, obj: dict[str, Any]) -> None:
        res = self._resource(obj["apiVersion"], obj["kind"])
        try:
            res.create(body={**obj, "apiVersion": res.group_version}, namespace=obj["metadata"]["namespace"])
        except ApiException as e:
            if e.status != 409:  # created meanwhile: the next pass compares it
                raise

    def patch_object(self, obj: dict[str, Any]) -> None:
        """Merge-patch the fields we own back onto the object (reverting a drift, or a replicas change)."""
        res = self._resource(obj["apiVersion"], obj["kind"])
        res.patch(
            body={**obj, "apiVersion": res.group_version},
            name=obj["metadata"]["name"],
            namespace=obj["metadata"]["namespace"],
            content_type="application/merge-patch+json",
        )

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api_client.sanitize_for_serialization(p) for p in pods.items]

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        try:
            self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": annotations}})
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, IMAGEJOB_PLURAL, name, propagation_policy="Background"
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None = None) -> None:
        """Record a Kubernetes Event on the object; losing one is not worth failing a transition for.

        With ``key`` the Event's name is derived from the object's uid and the key, so recording the same
        transition again (another replica, a redelivered worker event) is refused by the API server (409)
        instead of counting twice."""
        meta = obj["metadata"]
        now = datetime.now(UTC)
        if key:
            name = f"{meta['name'][:180]}.{(meta.get('uid') or '')[:8]}.{key}".lower()
            naming = client.V1ObjectMeta(name=name, namespace=meta["namespace"])
        else:
            naming = client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"])
        body = client.CoreV1Event(
            metadata=naming,
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
            if e.status == 409 and key:
                return  # recorded before
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)
