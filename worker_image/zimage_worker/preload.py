"""``python -m zimage_worker.preload``: download the model into the cache volume before workers start.

Run by the ModelDeployment's preload Job. The files land in ``MODELS_DIR/<hub id>``, the first place
``resolve_source`` looks, so workers then load from the volume (read-only, offline).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from zimage_queue import logs
from zimage_queue.message import ADAPTER_CACHE
from zimage_worker.engine import NOOP, TINY_RANDOM, resolve_source
from zimage_worker.settings import WorkerSettings

log = logging.getLogger("zimage_worker.preload")


def preload(cfg: WorkerSettings) -> Path | None:
    preload_adapters(cfg)
    if cfg.model_source in (TINY_RANDOM, NOOP):
        return None  # built in: nothing to fetch
    if not cfg.models_dir:
        raise SystemExit("MODELS_DIR is not set: nowhere to preload into")
    resolved = resolve_source(cfg.model_source, cfg.models_dir)
    if Path(resolved).is_dir():
        log.info("model already cached at %s", resolved)
        return Path(resolved)
    from huggingface_hub import snapshot_download

    target = Path(cfg.models_dir) / cfg.model_source
    log.info("downloading %s@%s into %s", cfg.model_source, cfg.revision or "main", target)
    snapshot_download(repo_id=cfg.model_source, revision=cfg.revision, local_dir=str(target))
    return target


def preload_adapters(cfg: WorkerSettings) -> None:
    """The ModelDeployment's LoRA adapters, where workers will look for them: objects (file://, s3://) into the
    adapter cache on the volume, hub ids under ``MODELS_DIR/<hub id>``; paths must be there already."""
    if not cfg.adapters:
        return
    if not cfg.models_dir:
        raise SystemExit("MODELS_DIR is not set: nowhere to preload adapters into")
    from zimage_worker.adapters import resolve_adapter_source

    cache = cfg.adapter_cache_dir or str(Path(cfg.models_dir) / ADAPTER_CACHE)
    for spec in cfg.adapters:
        where, _ = resolve_adapter_source(spec, models_dir=cfg.models_dir, cache_dir=cache)
        if Path(where).exists():
            log.info("adapter %s at %s", spec.name, where)
            continue
        from huggingface_hub import snapshot_download

        target = Path(cfg.models_dir) / spec.source
        log.info("downloading adapter %s (%s) into %s", spec.name, spec.source, target)
        snapshot_download(repo_id=spec.source, local_dir=str(target))


def main() -> int:
    logs.configure()
    preload(WorkerSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
