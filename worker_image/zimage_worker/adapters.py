"""LoRA adapters per job on a warm pipeline: loaded on first use, kept loaded (least recently used evicted beyond
``max_resident``), and switched between jobs with ``set_adapters``; the base weights are never reloaded.

The adapters a worker may apply are its ModelDeployment's spec.adapters, given as ZIMAGE_ADAPTERS. A job names
some of them with a scale each (``GenerationParams.loras``); ``ResidentAdapters.activate`` makes exactly that set
active before the pipeline call, and turns LoRA off for a job that names none, so no adapter leaks into it.

The three pipelines of ``DiffusersEngine`` share one transformer module, and the LoRA layers live in that module:
loading into the text-to-image pipeline applies to image-to-image and inpainting too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from zimage_queue.message import AdapterSpec, LoraRef
from zimage_worker import metrics
from zimage_worker.engine import AdapterSet, UnknownAdapter

log = logging.getLogger(__name__)

FETCHED_SCHEMES = ("file", "s3")  # copied once into the cache directory, then loaded from there
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


def default_cache_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "zimage-adapters")


def fetch_object(uri: str) -> bytes:
    """The bytes of a ``file://`` or ``s3://`` object. S3 takes its endpoint and region from the URI's query
    (``?endpoint=http://minio:9000&region=...``, as ZIMAGE_STORAGE_URL does), else from boto3's environment."""
    from zimage_worker.storage import open_store

    u = urlparse(uri)
    if u.scheme == "file":
        return Path(u.path).read_bytes()
    if u.scheme == "s3":
        store = open_store(f"s3://{u.netloc}" + (f"?{u.query}" if u.query else ""))
        return store.get(u._replace(query="").geturl())
    raise ValueError(f"cannot fetch {uri!r}: only file:// and s3:// adapter URIs are fetched")


def resolve_adapter_source(
    spec: AdapterSpec,
    *,
    models_dir: str | None,
    cache_dir: str,
    fetch: Callable[[str], bytes] = fetch_object,
) -> tuple[str, str | None]:
    """Where ``load_lora_weights`` reads ``spec`` from: ``(directory, file name, or hub id; weight_name)``.

    1. ``file://`` and ``s3://`` URIs: the object (``source``, or ``source/weightName`` when that is given) is
       fetched once into ``cache_dir`` and loaded from there, also after an eviction.
    2. An absolute path: a weights file, or a directory (with ``weightName`` when it holds several files).
    3. A relative path that exists under ``models_dir`` (the model cache volume; ``..`` cannot climb out).
    4. Anything else is a Hugging Face hub id, passed on as it is (diffusers downloads it at first use).
    """
    source, weight_name = spec.source, spec.weight_name
    u = urlparse(source)
    if u.scheme in FETCHED_SCHEMES:
        path = u.path.rstrip("/") + "/" + weight_name if weight_name else u.path
        obj = u._replace(path=path).geturl()
        name = Path(path).name or DEFAULT_WEIGHT_NAME
        local = Path(cache_dir) / hashlib.sha256(obj.encode()).hexdigest()[:16] / name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            data = fetch(obj)
            fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
            log.info("adapter %s: fetched %s (%d bytes) into %s", spec.name, obj, len(data), local)
        return str(local.parent), local.name
    if "://" in source:
        raise ValueError(f"adapter {spec.name}: unsupported source {source!r} (a path, file://, s3:// or a hub id)")
    candidate: Path | None = Path(source) if Path(source).is_absolute() else None
    if candidate is None and models_dir:
        root = Path(models_dir).resolve()
        inside = (root / source).resolve()
        if inside.is_relative_to(root) and inside != root and inside.exists():
            candidate = inside
    if candidate is None:
        return source, weight_name  # a hub id
    if candidate.is_file():
        return str(candidate.parent), candidate.name
    if not candidate.is_dir():
        raise FileNotFoundError(f"adapter {spec.name}: no file or directory at {candidate}")
    return str(candidate), weight_name


class ResidentAdapters:
    """The LoRA adapters loaded into one diffusers pipeline, and which of them are active at which scales.

    Not thread-safe, like the engine that owns it: one pipeline call at a time, ``activate`` right before it.
    Only ``resident`` and ``active`` may be read from another thread (a heartbeat): they return snapshots.
    """

    def __init__(
        self,
        pipe: Any,
        specs: Sequence[AdapterSpec],
        *,
        max_resident: int = 4,
        models_dir: str | None = None,
        cache_dir: str | None = None,
        fetch: Callable[[str], bytes] = fetch_object,
    ) -> None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}")
        self.pipe = pipe
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError("adapter names must be unique: " + ", ".join(s.name for s in specs))
        self.max_resident = max_resident
        self.models_dir = models_dir
        self.cache_dir = cache_dir or default_cache_dir()
        self.fetch = fetch
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._snapshot: tuple[str, ...] = ()  # _resident's names, replaced whole after each change
        self._active: AdapterSet = ()
        self._enabled = True  # LoRA layers switched on (diffusers' state after a load)
        # Adapters loaded and their time; switches between adapter sets and their time (loads included).
        self.loads = 0
        self.load_seconds = 0.0
        self.swaps = 0
        self.swap_seconds = 0.0

    @property
    def scales(self) -> dict[str, float]:
        return {name: s.default_scale for name, s in self.specs.items()}

    def resident(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return list(self._snapshot)

    def active(self) -> AdapterSet:
        return self._active

    def resolve(self, loras: Sequence[LoraRef] | None) -> AdapterSet:
        """``loras`` with their scales resolved (the job's, else the adapter's default), sorted by name."""
        unknown = sorted({lora.name for lora in loras or []} - self.specs.keys())
        if unknown:
            served = ", ".join(sorted(self.specs)) or "none"
            raise UnknownAdapter(f"unknown adapter(s) {', '.join(unknown)}: this worker serves {served}")
        return tuple(
            sorted(
                (lora.name, float(lora.scale if lora.scale is not None else self.specs[lora.name].default_scale))
                for lora in loras or []
            )
        )

    def activate(self, loras: Sequence[LoraRef] | None) -> AdapterSet:
        """Make exactly ``loras`` active (loading what is not resident), or none at all; returns the set."""
        wanted = self.resolve(loras)
        names = [name for name, _ in wanted]
        if wanted == self._active:
            for name in names:
                self._resident.move_to_end(name)
            self._snapshot = tuple(self._resident)
            return wanted
        started = time.perf_counter()
        if not wanted:
            if self._resident and self._enabled:  # no adapter may leak into a plain job
                self.pipe.disable_lora()
                self._enabled = False
        else:
            for name in names:
                self._ensure(name, keep=names)
            self.pipe.set_adapters(names, [scale for _, scale in wanted])
            if not self._enabled:
                self.pipe.enable_lora()
                self._enabled = True
        self._active = wanted
        self._snapshot = tuple(self._resident)
        seconds = time.perf_counter() - started
        self.swaps += 1
        self.swap_seconds += seconds
        metrics.ADAPTER_SWAP_SECONDS.observe(seconds)
        return wanted

    def unload_all(self) -> None:
        """Remove every adapter from the pipeline (the base model, as loaded)."""
        if self._resident:
            self.pipe.unload_lora_weights()
        self._resident.clear()
        self._snapshot = ()
        self._active = ()
        self._enabled = True
        metrics.ADAPTERS_RESIDENT.set(0)

    def _ensure(self, name: str, keep: Sequence[str]) -> None:
        """Load ``name`` unless it is resident, first evicting the least recently used adapters not in ``keep``
        so that at most ``max_resident`` stay loaded (more only while one job needs more at once)."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        limit = max(self.max_resident, len(keep))
        while len(self._resident) >= limit:
            victim = next((n for n in self._resident if n not in keep), None)
            if victim is None:
                break
            self.pipe.delete_adapters(victim)
            del self._resident[victim]
            self._snapshot = tuple(self._resident)
            log.info("adapter %s evicted (least recently used of %d)", victim, self.max_resident)
        spec = self.specs[name]
        where, weight_name = resolve_adapter_source(
            spec, models_dir=self.models_dir, cache_dir=self.cache_dir, fetch=self.fetch
        )
        started = time.perf_counter()
        kwargs = {"weight_name": weight_name} if weight_name else {}
        with warnings.catch_warnings():  # peft's notice that the model now holds several adapters: it does
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.pipe.load_lora_weights(where, adapter_name=name, **kwargs)
        self._resident[name] = None
        self._snapshot = tuple(self._resident)
        seconds = time.perf_counter() - started
        self.loads += 1
        self.load_seconds += seconds
        metrics.ADAPTER_LOADS.labels(adapter=name).inc()
        metrics.ADAPTERS_RESIDENT.set(len(self._resident))
        log.info("adapter %s loaded from %s in %.2fs", name, spec.source, seconds)
