"""API keys: ``zk_<id>_<secret>``, stored as SHA-256 hashes, one entry per key id, each mapped to a tenant.

In a cluster the entries are a Secret mounted as a volume (one file per key id, so the API needs no RBAC on
Secrets and the kubelet rolls out changes); the ring re-reads the directory when it changes. Keys are
random 32-byte secrets, so a plain SHA-256 is as strong as a slow hash here, and it is compared in constant
time against the one stored for the presented id.

An entry (JSON)::

    {"tenant": "team-a", "sha256": "<hex>", "ratePerSecond": 5, "burst": 10, "maxConcurrentJobs": 8, "bulk": true}

``bulk``: the key's jobs are bulk jobs unless a request asks otherwise (no ImageJob; see zimage_api.redis_store).
``admin``: the key sees every tenant's usage and job history (``GET /v1/usage``, ``GET /v1/jobs?source=history``,
``DELETE /v1/history?tenant=``); its own jobs are still its tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_KEY = re.compile(r"^zk_([a-z0-9]{1,32})_([A-Za-z0-9_-]{16,128})$")
TENANT_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # usable as a label value and name part


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    rate_per_second: float | None = None
    burst: int | None = None
    max_concurrent_jobs: int | None = None
    bulk: bool = False  # the key's default mode: bulk jobs (no ImageJob)
    admin: bool = False  # sees every tenant's usage and history


@dataclass(frozen=True)
class KeyEntry:
    principal: Principal
    sha256: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str | None = None) -> str:
    return f"zk_{key_id or secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def key_id(key: str) -> str | None:
    m = _KEY.match(key)
    return m.group(1) if m else None


def entry_json(key: str, tenant: str, **limits: Any) -> str:
    """What to store under the key's id in the Secret."""
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"tenant must be a DNS label (a-z, 0-9, -), got {tenant!r}")
    return json.dumps({"tenant": tenant, "sha256": hash_key(key), **{k: v for k, v in limits.items() if v}})


def parse_entry(kid: str, raw: str) -> KeyEntry:
    data = json.loads(raw)
    tenant = str(data["tenant"])
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"bad tenant {tenant!r}")
    return KeyEntry(
        Principal(
            key_id=kid,
            tenant=tenant,
            rate_per_second=data.get("ratePerSecond"),
            burst=data.get("burst"),
            max_concurrent_jobs=data.get("maxConcurrentJobs"),
            bulk=data.get("bulk") is True,
            admin=data.get("admin") is True,
        ),
        str(data["sha256"]).lower(),
    )


class KeyRing:
    def __init__(self, entries: dict[str, KeyEntry] | None = None, directory: str | None = None) -> None:
        self._static = dict(entries or {})
        self._dir = Path(directory) if directory else None
        self._loaded: dict[str, KeyEntry] = {}
        self._stamp: tuple[float, ...] | None = None
        self._checked = 0.0

    @classmethod
    def with_dev_key(cls, key: str, tenant: str, directory: str | None = None, *, admin: bool = False) -> KeyRing:
        kid = key_id(key)
        if kid is None:
            raise ValueError("the dev key must look like zk_<id>_<secret> (secret: 16+ characters)")
        return cls({kid: KeyEntry(Principal(kid, tenant, admin=admin), hash_key(key))}, directory)

    def _refresh(self) -> None:
        if self._dir is None or time.monotonic() - self._checked < 2.0:
            return
        self._checked = time.monotonic()
        try:
            files = sorted(p for p in self._dir.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as e:
            log.warning("cannot read API keys from %s: %s", self._dir, e)
            return
        stamp = (*(p.stat().st_mtime for p in files), len(files))
        if stamp == self._stamp:
            return
        loaded = {}
        for p in files:
            try:
                loaded[p.name] = parse_entry(p.name, p.read_text())
            except (ValueError, KeyError, json.JSONDecodeError) as e:
                log.warning("ignoring API key entry %s: %s", p.name, e)  # never the content: it is a secret
        self._loaded, self._stamp = loaded, stamp
        log.info("loaded %d API key(s) from %s", len(loaded), self._dir)

    def authenticate(self, key: str) -> Principal | None:
        kid = key_id(key)
        if kid is None:
            return None
        self._refresh()
        entry = self._static.get(kid) or self._loaded.get(kid)
        if entry is None:
            hmac.compare_digest(hash_key(key), hash_key(key))  # same work for unknown ids
            return None
        return entry.principal if hmac.compare_digest(hash_key(key), entry.sha256) else None
