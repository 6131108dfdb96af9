"""The only module that talks to the Kubernetes API server.

``Kube`` is the official client (sync, so called through ``asyncio.to_thread``), for the low-rate calls: pools,
children, housekeeping. ``AsyncKube`` is the per-job hot path (admission and worker events: read a job, write its
status, record an Event): raw JSON over one pooled aiohttp session, no model classes and no threads, so a burst of
thousands of jobs costs one request per write and no deserialisation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL, VERSION
from zimage_operator.workflow_types import IMAGEWORKFLOW_PLURAL

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


class KubeError(Exception):
    """The API server refused a request of the async client (``status`` is its HTTP status; 0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def load_configuration() -> client.Configuration:
    """In-cluster credentials (the pod's ServiceAccount), else the kubeconfig (``KUBECONFIG``)."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        # KUBECONFIG as it is now: the client reads it once, when kubernetes.config is first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    return cfg


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            api_client = client.ApiClient(load_configuration())
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
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; the object written, or None when it is gone.

        With ``resource_version`` the patch applies only to that version of the object, else StatusConflict.
        """
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            obj: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, body
            )
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status == 409:
                raise StatusConflict(f"{plural} {namespace}/{name} changed since version {resource_version}") from e
            raise

    def patch_workflow_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        """An ImageWorkflow's status onto that version (else StatusConflict); the object written, None if gone."""
        return self._patch_status(IMAGEWORKFLOW_PLURAL, namespace, name, status, resource_version)

    def _delete(self, plural: str, namespace: str, name: str) -> None:
        """Delete one of our objects (what it owns goes with it, in the background); gone already is fine."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, propagation_policy="Background"
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_workflow(self, namespace: str, name: str) -> None:
        """Delete an ImageWorkflow; its step jobs go with it (owner references)."""
        self._delete(IMAGEWORKFLOW_PLURAL, namespace, name)

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        return self._patch_status(MODELDEPLOYMENT_PLURAL, namespace, name, status) is not None

    def patch_job_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> bool:
        return self._patch_status(IMAGEJOB_PLURAL, namespace, name, status, resource_version) is not None

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
        self._delete(IMAGEJOB_PLURAL, namespace, name)

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None = None) -> None:
        """Record a Kubernetes Event on the object (see ``event_body``); losing one is not worth failing a
        transition for."""
        body = event_body(obj, type_, reason, message, key, self.host, datetime.now(UTC))
        try:
            self.core.create_namespaced_event(body["metadata"]["namespace"], body)
        except ApiException as e:
            if e.status == 409 and key:
                return  # recorded before
            meta = obj["metadata"]
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)


def event_body(
    obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None, host: str, now: datetime
) -> dict[str, Any]:
    """A core/v1 Event on ``obj``. With ``key`` its name derives from the object's uid and the key, so recording
    the same transition again (another replica, a redelivered worker event) is refused (409), not counted twice."""
    meta = obj["metadata"]
    naming: dict[str, Any] = {"namespace": meta["namespace"]}
    if key:
        naming["name"] = f"{meta['name'][:180]}.{(meta.get('uid') or '')[:8]}.{key}".lower()
    else:
        naming["generateName"] = f"{meta['name']}."
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": naming,
        "involvedObject": {
            "apiVersion": obj.get("apiVersion") or f"{GROUP}/{VERSION}",
            "kind": obj.get("kind") or "ImageJob",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": COMPONENT, "host": host},
        "reportingComponent": COMPONENT,
        "reportingInstance": host,
    }


# Who owns what we write, in managedFields (`kubectl get --show-managed-fields`): named, not the HTTP library.
FIELD_MANAGER = f"?fieldManager={COMPONENT}"


class AsyncKube:
    """ImageJob reads and status writes, and Event posts, as raw JSON on a pooled keep-alive session."""

    def __init__(self, cfg: client.Configuration, max_connections: int = 32) -> None:
        self.cfg = cfg
        self.host = socket.gethostname()
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.cfg.host.startswith("https"):
            return False
        if not self.cfg.verify_ssl:
            return False
        ctx = ssl.create_default_context(cafile=self.cfg.ssl_ca_cert or None)
        if self.cfg.cert_file:
            ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file or None)
        return ctx

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, ssl=self._ssl(), keepalive_timeout=60)
            timeout = aiohttp.ClientTimeout(
                total=READ_TIMEOUT_SECONDS + CONNECT_TIMEOUT_SECONDS, sock_connect=CONNECT_TIMEOUT_SECONDS
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        # What the official client sends (a bearer token; rotated ServiceAccount tokens and exec plugins refreshed).
        for auth in self.cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, content_type: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        if data is not None and content_type is None:
            content_type = "application/json"
        try:
            async with self.session().request(
                method, self.cfg.host + path, data=data, headers=self._headers(content_type)
            ) as resp:
                raw = await resp.read()
                try:
                    answer = json.loads(raw) if raw else {}
                except ValueError:
                    answer = {"message": raw[:200].decode(errors="replace")}
                return resp.status, answer if isinstance(answer, dict) else {}
        except (TimeoutError, aiohttp.ClientError) as e:
            raise KubeError(0, f"{type(e).__name__}: {e}") from e

    @staticmethod
    def _job_path(namespace: str, name: str, sub: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{IMAGEJOB_PLURAL}/{quote(name)}"
        return path + (f"/{sub}" if sub else "")

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        status, obj = await self._request("GET", self._job_path(namespace, name))
        if status == 404:
            return None
        if status >= 300:
            raise KubeError(status, str(obj.get("message", "")))
        return obj

    async def patch_job_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; the object as written, or None when it is gone.

        With ``resource_version`` the patch applies only to that version, else StatusConflict."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        code, obj = await self._request(
            "PATCH", self._job_path(namespace, name, "status") + FIELD_MANAGER, body, "application/merge-patch+json"
        )
        if code == 404:
            return None
        if code == 409:
            raise StatusConflict(f"{IMAGEJOB_PLURAL} {namespace}/{name} changed since version {resource_version}")
        if code >= 300:
            raise KubeError(code, str(obj.get("message", "")))
        return obj

    async def post_event(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None = None
    ) -> bool:
        """Record an Event; False when it was not (refused, or recorded before under ``key``)."""
        body = event_body(obj, type_, reason, message, key, self.host, datetime.now(UTC))
        code, answer = await self._request(
            "POST", f"/api/v1/namespaces/{quote(body['metadata']['namespace'])}/events", body
        )
        if code == 409 and key:
            return False
        if code >= 300:
            log.warning(
                "could not record event %s on %s/%s: %s %s",
                reason,
                body["metadata"]["namespace"],
                obj["metadata"]["name"],
                code,
                answer.get("message", ""),
            )
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
