"""Schemathesis against the running API's own OpenAPI schema: valid and invalid requests alike, never a 5xx.

Bounded for CI (ZIMAGE_FUZZ_EXAMPLES per operation and mode); the no-op model keeps each call cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from zimage_api.app import create_app
from zimage_api.local import DEV_KEY, local_api, serve_in_thread
from zimage_api.settings import ApiSettings
from zimage_api.store import MemoryJobStore
from zimage_worker.engine import NoopEngine

EXAMPLES = int(os.environ.get("ZIMAGE_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def fuzz_url() -> Iterator[str]:
    # Limits high enough that the fuzzer meets the validation, not the rate limiter.
    with (
        local_api(engine=NoopEngine(), rate_per_second=1e6, rate_burst=1_000_000, max_concurrent_jobs=100_000) as la,
        serve_in_thread(la.app) as url,
    ):
        yield url


# The schema the app serves at /openapi.json; building the app connects to nothing.
schema = schemathesis.openapi.from_dict(create_app(ApiSettings(), MemoryJobStore("schema", [])).openapi())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.timeout(300)
def test_api_never_answers_5xx(case: schemathesis.Case, fuzz_url: str) -> None:
    case.call_and_validate(
        base_url=fuzz_url, headers={"Authorization": f"Bearer {DEV_KEY}"}, checks=[not_a_server_error], timeout=30
    )


def test_fuzzed_schema_is_the_served_one(fuzz_url: str) -> None:
    import httpx

    assert httpx.get(f"{fuzz_url}/openapi.json").json() == schema.raw_schema
