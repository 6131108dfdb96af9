"""The zimage API as the CLI uses it (httpx, and httpx-sse for the event streams). Every failure, from a refused
connection to a 4xx, leaves here as a one-line ``CliError``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from zimage_api.cli_errors import Failure, UserError, from_response, unreachable

TERMINAL_EVENTS = ("succeeded", "failed", "cancelled")
# A synchronous call (/v1/images/edits) waits for its images: the server bounds it (504 after
# ZIMAGE_API_SYNC_TIMEOUT_SECONDS, 300 by default), so the client's read gives it more than that.
SYNC_READ_SECONDS = 900.0


class ApiClient:
    """``transport``: an ``httpx.MockTransport`` in tests."""

    def __init__(
        self, url: str, key: str = "", *, timeout: float = 60.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        if not re.match(r"^https?://[^/]", url):
            raise UserError(f"--api: not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        # Image links are signed and open without the key; a presigned S3 URL must not be sent it either.
        self.links = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.http.close()
        self.links.close()

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from e

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """The response's JSON; a 4xx or 5xx raises."""
        with self._reaching():
            r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            raise from_response(r)
        return r.json()

    def sync_call(self, method: str, path: str, **kw: Any) -> Any:
        """``call`` for an endpoint that answers when its job is done."""
        return self.call(method, path, timeout=httpx.Timeout(self.http.timeout.connect, read=SYNC_READ_SECONDS), **kw)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's Server-Sent Events, ``(event, data)``, until the server ends the stream (after the final one)."""
        with self._reaching(), connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events") as source:
            if source.response.status_code >= 400:
                source.response.read()
                raise from_response(source.response)
            try:
                for sse in source.iter_sse():
                    yield sse.event, sse.json()
            except SSEError as e:
                raise Failure(f"the API's event stream for {job_id} is not one: {e}") from e

    def download(self, url: str) -> bytes:
        with self._reaching():
            r = self.links.get(url)
        if r.status_code >= 400:
            raise from_response(r)
        return r.content
