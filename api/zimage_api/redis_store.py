"""Bulk jobs: the API's jobs without an ImageJob, for tenants that submit too many to keep in etcd.

A bulk job goes through the same admission (``zimage_operator.reconcile.admit``), queue, workers, events and
results as an ImageJob; only its record differs. What the API knows when it admits the job (metadata, spec, the
Queued status it writes, a cancel) is one Redis hash that expires after the operator's job retention
(``keys.bulk_job``); everything after that is read back from the queue's own record of the job (state,
attempts, worker, final event, results), which the workers write anyway. So nothing writes a bulk job's status
but the API at admission and cancel, and the operator is not involved: the message (and so each worker event)
carries ``bulk``, and the operator leaves those events alone.

Listing goes through a per-tenant sorted set by creation time (``keys.bulk_index``), trimmed to the retention
and to ``max_listed`` entries on every create. The objects handed out are Kubernetes-shaped, as the other
stores', with the label ``zimage.dev/bulk: "true"``: the routes are written once. ``kubectl get ij`` does not
see these jobs.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import ValidationError

from zimage_api.store import TENANT_LABEL, JobExists, JobStore, StaleVersion, merge_patch, new_job
from zimage_operator import reconcile
from zimage_operator.conditions import iso, parse_iso
from zimage_operator.types import TERMINAL_PHASES
from zimage_queue import JobEvent, JobQueue, ResultImage, keys
from zimage_queue.clients import SyncClient
from zimage_queue.entries import text

BULK_LABEL = "zimage.dev/bulk"
TOKEN_PREFIX = "bulk."

_OBJECT, _STATUS, _VERSION = keys.F_BULK_OBJECT, "status", "rv"
_RECORD_FIELDS = (keys.F_STATE, keys.F_ATTEMPTS, keys.F_WORKER, keys.F_FINAL, keys.F_RESULT, keys.F_CANCEL)

# KEYS: job hash ; ARGV: object json, ttl -> 0 when the name is taken. One key: fine on Redis Cluster.
_CREATE = f"""
if redis.call('HSETNX', KEYS[1], '{_OBJECT}', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], '{_VERSION}', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


def is_bulk(job: dict[str, Any]) -> bool:
    return (job["metadata"].get("labels") or {}).get(BULK_LABEL) == "true"


@dataclass(frozen=True)
class QueueRecord:
    """What the queue keeps of a job (``keys.job``); all None when it has no record (yet, or any more)."""

    state: str | None = None
    attempts: int = 0
    worker: str | None = None
    final: JobEvent | None = None
    results: list[ResultImage] | None = None
    cancel: bool = False


def parse_record(values: list[Any]) -> QueueRecord:
    state, attempts, worker, final, result, cancel = (None if v is None else text(v) for v in values)
    try:
        event = JobEvent.model_validate_json(final) if final else None
        results = [ResultImage.model_validate(x) for x in json.loads(result)] if result else None
    except (ValidationError, ValueError):  # a record no release of ours wrote: the job reads as not finished
        event, results = None, None
    return QueueRecord(
        state=state,
        attempts=int(attempts or 0),
        worker=worker,
        final=event,
        results=results,
        cancel=cancel is not None,
    )


def derive_status(
    stored: dict[str, Any], record: QueueRecord, spec: dict[str, Any], meta: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """A bulk job's status (pure): what the API wrote (Queued, or its cancel), advanced by the queue's record
    with the operator's own ``event_patch``, as an ImageJob's status would be. A status the API made final
    (its cancel) stands, as on an ImageJob; a job past its ``timeoutSeconds`` is Failed/Timeout from its
    deadline on. Progress steps are in the events only (``GET /v1/jobs/{id}/events``)."""
    status = copy.deepcopy(stored)
    if status.get("phase") in TERMINAL_PHASES:
        return status
    if record.attempts and record.state == "running":
        status.update(
            phase="Running",
            worker=record.worker,
            attempts=record.attempts,
            message=f"running on {record.worker} (attempt {record.attempts})",
        )
    elif record.attempts:
        status["attempts"] = record.attempts  # a failed attempt, requeued
    if record.final is not None:
        ev = record.final
        if ev.type == "succeeded" and not ev.results and record.results:
            ev = ev.model_copy(update={"results": record.results})
        patch, _ = reconcile.event_patch(status, ev, now)
        if patch:
            merge_patch(status, patch)
            if ev.run_seconds is not None and not status.get("startedAt"):
                status["startedAt"] = iso(datetime.fromtimestamp(ev.ts - ev.run_seconds, UTC))
        return status
    limit = spec.get("timeoutSeconds")
    created = parse_iso(meta.get("creationTimestamp"))
    if limit and created is not None:
        deadline = datetime.fromtimestamp(created.timestamp() + limit, UTC)
        if deadline <= now:
            merge_patch(status, reconcile.timeout_patch(spec, status, meta, deadline) or {})
    return status


def page_token(score: float, name: str) -> str:
    return f"{TOKEN_PREFIX}{int(score)}.{name}"


def parse_page_token(token: str) -> tuple[int, str]:
    """(score, name) of the last job a page showed; ValueError for anything else."""
    score, sep, name = token.removeprefix(TOKEN_PREFIX).partition(".")
    if not token.startswith(TOKEN_PREFIX) or not sep or not name or not score.isdigit():
        raise ValueError("not a page token of this list")
    return int(score), name


class RedisJobStore:
    """The JobStore of bulk jobs (sync: call from a thread). Models come from ``models``, the cluster's store."""

    def __init__(
        self,
        r: SyncClient,
        queue: JobQueue,
        namespace: str,
        models: JobStore,
        *,
        retention_seconds: int,
        max_listed: int,
    ) -> None:
        self.r: Any = r
        self.queue = queue
        self.namespace = namespace
        self.models = models
        self.retention_seconds = retention_seconds
        self.max_listed = max_listed
        self._create = r.register_script(_CREATE)

    # -- writes (the API's own: admission and cancel) ----------------------------------------------------
    def create_job(
        self, name: str, spec: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]
    ) -> dict[str, Any]:
        tenant = labels[TENANT_LABEL]
        now = time.time()
        obj = new_job(
            self.namespace, name, spec, {**labels, BULK_LABEL: "true"}, annotations, datetime.fromtimestamp(now, UTC)
        )
        if not int(
            self._create(keys=[keys.bulk_job(self.namespace, name)], args=[json.dumps(obj), self.retention_seconds])
        ):
            raise JobExists(name)
        index = keys.bulk_index(self.namespace, tenant)
        now_ms = int(now * 1000)
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(index, {name: now_ms})
        pipe.zremrangebyscore(index, "-inf", f"({now_ms - self.retention_seconds * 1000}")
        pipe.zremrangebyrank(index, 0, -(self.max_listed + 1))
        pipe.expire(index, self.retention_seconds)
        pipe.execute()
        obj["metadata"]["resourceVersion"] = "1"
        obj["status"] = {}
        return obj

    def enqueued(self, uid: str) -> None:
        """After the job's message is on the queue: its record, which lives without a TTL until a worker
        finishes the job, expires after the retention even if no worker ever does (no ImageJob deletion will
        come to forget it)."""
        self.queue.expire_soon(uid, self.retention_seconds)

    def discard(self, name: str) -> None:
        """A job whose admission failed half-way: gone, as if never created (it stays in the index until
        trimmed; listing skips names without a job)."""
        self.r.delete(keys.bulk_job(self.namespace, name))

    def patch_job_status(self, name: str, status: dict[str, Any], resource_version: str | None = None) -> bool:
        key = keys.bulk_job(self.namespace, name)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    stored, version = pipe.hmget(key, _STATUS, _VERSION)
                    if version is None:
                        return False
                    if resource_version and text(version) != resource_version:
                        raise StaleVersion(f"job {name} changed since version {resource_version}")
                    merged = json.loads(text(stored)) if stored else {}
                    merge_patch(merged, status)
                    pipe.multi()
                    pipe.hset(key, _STATUS, json.dumps(merged))
                    pipe.hincrby(key, _VERSION, 1)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    # -- reads -----------------------------------------------------------------------------------------------
    def get_job(self, name: str) -> dict[str, Any] | None:
        raw = self.r.hmget(keys.bulk_job(self.namespace, name), _OBJECT, _STATUS, _VERSION)
        if raw[0] is None:
            return None
        [job] = self._assemble([raw])
        return job

    def _assemble(self, rows: list[list[Any]]) -> list[dict[str, Any]]:
        """Stored objects -> jobs with their derived status (one pipelined read of their queue records)."""
        objs = []
        for obj_raw, status_raw, version in rows:
            obj = json.loads(text(obj_raw))
            obj["metadata"]["resourceVersion"] = text(version) if version is not None else "1"
            obj["status"] = json.loads(text(status_raw)) if status_raw else {}
            objs.append(obj)
        records = self.queue.records([obj["metadata"]["uid"] for obj in objs], list(_RECORD_FIELDS))
        now = datetime.now(UTC)
        for obj, values in zip(objs, records, strict=True):
            record = parse_record(values)
            obj["status"] = derive_status(obj["status"], record, obj["spec"], obj["metadata"], now)
            if obj["status"].get("phase") == "Failed" and not record.cancel and not record.final:
                self.queue.cancel(obj["metadata"]["uid"])  # past its timeoutSeconds: the worker stops
        return objs

    def list_jobs(
        self, labels: dict[str, str], limit: int, continue_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first. ``labels`` must name the tenant (the index is per tenant); other labels filter."""
        index = keys.bulk_index(self.namespace, labels[TENANT_LABEL])
        if continue_token is None:
            entries = self.r.zrange(
                index, "+inf", "-inf", desc=True, byscore=True, offset=0, num=limit + 1, withscores=True
            )
        else:
            score, last = parse_page_token(continue_token)
            ties = int(self.r.zcount(index, score, score))
            entries = [
                (m, s)
                for m, s in self.r.zrange(
                    index, score, "-inf", desc=True, byscore=True, offset=0, num=limit + ties + 1, withscores=True
                )
                if s < score or text(m) < last  # same score: reverse name order, as ZRANGE REV gives it
            ]
        more = len(entries) > limit
        entries = entries[:limit]
        pipe = self.r.pipeline(transaction=False)
        for name, _ in entries:
            pipe.hmget(keys.bulk_job(self.namespace, text(name)), _OBJECT, _STATUS, _VERSION)
        rows = [row for row in (pipe.execute() if entries else []) if row[0] is not None]  # expired meanwhile
        jobs = [
            j
            for j in self._assemble(rows)
            if all((j["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        ]
        token = page_token(entries[-1][1], text(entries[-1][0])) if more else None
        return jobs, token

    def listed(self, tenant: str) -> int:
        """How many of the tenant's bulk jobs the index holds (at most ``max_listed``)."""
        return int(self.r.zcard(keys.bulk_index(self.namespace, tenant)))

    def get_model(self, name: str) -> dict[str, Any] | None:
        return self.models.get_model(name)

    def list_models(self) -> list[dict[str, Any]]:
        return self.models.list_models()

    def ready(self) -> None:
        self.r.ping()
