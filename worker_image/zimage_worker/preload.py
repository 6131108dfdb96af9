"""``python -m zimage_worker.preload``: download the model into the cache volume before workers start.

Run by the ModelDeployment's preload Job. The files land in ``MODELS_DIR/<hub id>``, the first place
``resolve_source`` looks, so workers then load from the volume (read-only, offline).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from zimage_queue import logs
from zimage_worker.engine import NOOP, TINY_RANDOM, resolve_source
from zimage_worker.settings import WorkerSettings

log = logging.getLogger("zimage_worker.preload")


def preload(cfg: WorkerSettings) -> Path | None:
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


def main() -> int:
    logs.configure()
    preload(WorkerSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
