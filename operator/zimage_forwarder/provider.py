"""One call to an OpenAI-compatible provider, classified for the key pool and the retry loop.

``ok``: the answer (text, or image bytes). ``rate_limited``: 429 (with the provider's ``Retry-After``): the key
rests, the job tries another. ``unavailable``: 5xx, a timeout or no connection: retried with backoff, and the
key's failures count toward its circuit breaker. ``rejected``: any other 4xx: the request itself is wrong (a
prompt refused, a size not offered), so no retry helps; the key is fine.
"""

from __future__ import annotations

import base64
import email.utils
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from zimage_queue import GenerationParams

Status = Literal["ok", "rate_limited", "unavailable", "rejected"]
ERROR_TEXT_LIMIT = 500


@dataclass
class Reply:
    status: Status
    message: str = ""
    retry_after: float | None = None
    text: str | None = None
    images: list[bytes] = field(default_factory=list)
    tokens: int | None = None


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """``retry-after-ms`` (OpenAI's), else ``Retry-After`` in seconds or as an HTTP date."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - (now or time.time()))


def estimate_tokens(params: GenerationParams) -> int:
    """What a chat call may cost before the provider says: the prompt (about 4 characters a token) and a reply."""
    return len(params.prompt) // 4 + 512


class Provider:
    def __init__(self, api: Literal["chat", "images"], base_url: str, model: str, client: httpx.AsyncClient) -> None:
        self.api = api
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.client = client

    async def call(
        self, key: str, params: GenerationParams, image: bytes | None = None, mask: bytes | None = None
    ) -> Reply:
        headers = {"Authorization": f"Bearer {key}"}
        try:
            if self.api == "chat":
                body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": params.prompt}]}
                r = await self.client.post(f"{self.base_url}/chat/completions", json=body, headers=headers)
            elif image is None:
                r = await self.client.post(
                    f"{self.base_url}/images/generations", json=self._image_fields(params), headers=headers
                )
            else:
                files = {"image": ("image.png", image, "image/png")}
                if mask is not None:
                    files["mask"] = ("mask.png", mask, "image/png")
                data = {k: str(v) for k, v in self._image_fields(params).items()}
                r = await self.client.post(f"{self.base_url}/images/edits", data=data, files=files, headers=headers)
        except httpx.TimeoutException as e:
            return Reply("unavailable", f"timed out: {type(e).__name__}")
        except httpx.TransportError as e:
            return Reply("unavailable", f"{type(e).__name__}: {e}"[:ERROR_TEXT_LIMIT])
        return self._classify(r)

    def _image_fields(self, params: GenerationParams) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "model": self.model,
            "prompt": params.prompt,
            "n": params.num_images,
            "size": f"{params.width}x{params.height}",
            "response_format": "b64_json",
        }
        return fields

    def _classify(self, r: httpx.Response) -> Reply:
        if r.status_code == 429:
            return Reply("rate_limited", _error_text(r), retry_after=retry_after(r.headers))
        if r.status_code >= 500 or r.status_code in (408, 409):
            return Reply("unavailable", f"{r.status_code}: {_error_text(r)}", retry_after=retry_after(r.headers))
        if r.status_code >= 400:
            return Reply("rejected", f"{r.status_code}: {_error_text(r)}")
        try:
            body = r.json()
            if self.api == "chat":
                text = body["choices"][0]["message"]["content"]
                usage = body.get("usage") or {}
                return Reply("ok", text=str(text), tokens=usage.get("total_tokens"))
            images = [base64.b64decode(d["b64_json"]) for d in body["data"]]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return Reply("unavailable", f"unreadable answer: {type(e).__name__}: {e}"[:ERROR_TEXT_LIMIT])
        return Reply("ok", images=images)


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:ERROR_TEXT_LIMIT]
    except (ValueError, KeyError, TypeError):
        return r.text[:ERROR_TEXT_LIMIT]
