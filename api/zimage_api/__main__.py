"""``zimage-api``: the REST front door in a cluster (ImageJobs in ZIMAGE_API_NAMESPACE, Redis at ZIMAGE_REDIS_URL)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from zimage_api.app import create_app
from zimage_api.kube_store import KubeJobStore
from zimage_api.settings import ApiSettings
from zimage_queue import logs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zimage-api", description=__doc__)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("-n", "--namespace", default=None)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = ApiSettings(**overrides)
    logs.configure()
    app = create_app(settings, KubeJobStore(settings.namespace))
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, proxy_headers=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
