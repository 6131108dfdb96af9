"""Write the API's OpenAPI schema: ``python -m zimage_api.openapi docs/openapi.json``.

The schema is the one the app serves at ``/openapi.json``; building the app connects to nothing (Redis clients are
lazy), so this runs without a cluster or Redis. A test fails while the committed file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from zimage_api.app import create_app
from zimage_api.settings import ApiSettings
from zimage_api.store import MemoryJobStore

DEFAULT_OUTPUT = "docs/openapi.json"
COMMAND = "python -m zimage_api.openapi docs/openapi.json"


def schema() -> dict[str, Any]:
    return create_app(ApiSettings(), MemoryJobStore("x", [])).openapi()


def render() -> str:
    return json.dumps(schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or [DEFAULT_OUTPUT])[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())


if __name__ == "__main__":
    main()
