"""A stand-in for an external OpenAI-compatible provider: a real HTTP server on loopback, with per-key rate limits
and injectable faults, that records every request it sees.

It speaks enough of the OpenAI API for the official SDK (``base_url=p.url``):

* ``POST /v1/chat/completions``: a deterministic reply derived from the last user message (``stream`` too), with
  ``usage`` (one token per word);
* ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart): PNG/JPEG/WebP images of the
  requested ``size`` as ``b64_json`` (or ``url``, served from memory), the colour derived from the prompt;
* ``GET /v1/models``.

Every request needs ``Authorization: Bearer <key>`` with a known key (else 401). Each key may have a
sliding-window limit (``requests`` per ``per_seconds``: a request is refused while ``requests`` accepted ones
started within the last ``per_seconds``) and a concurrency limit; over a limit the answer is 429 with
``Retry-After`` (whole seconds, rounded up), ``retry-after-ms`` and OpenAI's error body. Faults, changeable while
it runs: ``latency`` (seconds, or a ``(low, high)`` range drawn uniformly), ``fail_rate`` (the share answered
``fail_status``), ``down`` (every request answered 503), ``hang_rate`` (the share that hangs ``hang_seconds``,
for client timeouts). A key's ``status`` makes that key alone always answer it (a revoked key: 401; a broken
one: 500).

Recorded per request (``records()``): key, path, start and end (epoch seconds), status; ``peak()`` is the most
requests in any window. In a test: ``with ProviderStandIn(keys={"k1": "4/1s"}, latency=0.05) as p: p.url``. On
the test bed: ``python -m bench.provider --port 8080 --keys k1,k2 --rate 4/1s --latency 0.2 --fail 503``, whose
records and faults are at ``GET /_standin/records`` and ``POST /_standin/faults`` (JSON of the fault
attributes), ``POST /_standin/reset`` clears the records and the windows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import hashlib
import io
import json
import math
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError

DEFAULT_SIZE = (1024, 1024)
MAX_SIDE = 4096
MAX_IMAGES = 10
KEPT_FILES = 256  # images answered as ``url`` stay this many requests
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(ms|s|sec|m|min|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, None: 1.0}
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def parse_rate(text: str) -> tuple[int, float]:
    """``4/1s``, ``4/s``, ``60/1m``, ``500/min``, ``10/250ms`` -> (requests, per_seconds)."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"a rate is REQUESTS/[N]UNIT (4/1s, 60/min, 10/250ms), not {text!r}")
    n = float(m[2]) if m[2] else 1.0
    per = n * _UNITS[m[3]]
    if int(m[1]) < 1 or per <= 0:
        raise ValueError(f"a rate needs at least one request per a positive time: {text!r}")
    return int(m[1]), per


@dataclass(frozen=True)
class KeySpec:
    """One key the stand-in accepts: its limits (None: none) and a status it always answers (None: none)."""

    requests: int | None = None
    per_seconds: float = 60.0
    concurrency: int | None = None
    status: int | None = None

    @classmethod
    def parse(cls, value: KeySpec | str | None) -> KeySpec:
        if isinstance(value, KeySpec):
            return value
        if not value:
            return cls()
        requests, per = parse_rate(value)
        return cls(requests=requests, per_seconds=per)


@dataclass(frozen=True)
class Record:
    key: str | None  # the bearer token (None: no Authorization header)
    path: str
    start: float  # epoch seconds, on arrival
    end: float  # when the answer's head went out
    status: int


def max_in_window(times: Iterable[float], per_seconds: float) -> int:
    """The most of ``times`` in any closed window ``[t, t + per_seconds]``."""
    ts = sorted(times)
    best = 0
    for i, t in enumerate(ts):
        best = max(best, bisect.bisect_right(ts, t + per_seconds) - i)
    return best


def _error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def parse_size(size: Any, default: tuple[int, int]) -> tuple[int, int]:
    if size in (None, "", "auto"):
        return default
    m = re.fullmatch(r"(\d+)x(\d+)", str(size))
    if not m or not (0 < int(m[1]) <= MAX_SIDE and 0 < int(m[2]) <= MAX_SIDE):
        raise BadRequest(f"size must be WIDTHxHEIGHT (at most {MAX_SIDE} a side) or auto, not {size!r}", "size")
    return int(m[1]), int(m[2])


def colour(prompt: str, index: int = 0) -> tuple[int, int, int]:
    d = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    return d[0], d[1], d[2]


def encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=_FORMATS[fmt])
    return out.getvalue()


class ProviderStandIn:
    """``with ProviderStandIn(keys={"k1": "4/1s", "k2": None}) as p: OpenAI(base_url=p.url, api_key="k1")``.

    ``keys``: key -> ``KeySpec``, a rate (``"4/1s"``) or None (no limit); or just the keys. The fault attributes
    (``latency``, ``fail_rate``, ``fail_status``, ``down``, ``hang_rate``, ``hang_seconds``) may be changed while
    it runs; ``seed`` makes the random faults repeatable."""

    def __init__(
        self,
        keys: Mapping[str, KeySpec | str | None] | Iterable[str] = ("test-key",),
        *,
        latency: float | tuple[float, float] = 0.0,
        fail_rate: float = 0.0,
        fail_status: int = 503,
        down: bool = False,
        hang_rate: float = 0.0,
        hang_seconds: float = 30.0,
        host: str = "127.0.0.1",
        port: int | None = None,
        seed: int | None = None,
    ) -> None:
        items = keys.items() if isinstance(keys, Mapping) else ((k, None) for k in keys)
        self.keys: dict[str, KeySpec] = {k: KeySpec.parse(v) for k, v in items}
        self.latency = latency
        self.fail_rate = fail_rate
        self.fail_status = fail_status
        self.down = down
        self.hang_rate = hang_rate
        self.hang_seconds = hang_seconds
        self.host = host
        self.port = port
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._windows: dict[str, deque[float]] = {}
        self._in_flight: Counter[str] = Counter()
        self._files: dict[str, tuple[bytes, str]] = {}
        self._closing = False
        self._stack: ExitStack | None = None
        self.root = ""  # http://host:port, once started
        self.app = self._build()

    # -- running ---------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes (``.../v1``)."""
        return f"{self.root}/v1"

    def __enter__(self) -> ProviderStandIn:
        from zimage_api.local import serve_in_thread

        self._closing = False
        self._stack = ExitStack()
        self.root = self._stack.enter_context(
            serve_in_thread(self.app, host=self.host, port=self.port, timeout_graceful_shutdown=2)
        )
        self.port = int(self.root.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True  # hanging requests end
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # -- what it saw -----------------------------------------------------------------------------------------
    def records(self, key: str | None = None, path: str | None = None, status: int | None = None) -> list[Record]:
        with self._lock:
            out = list(self._records)
        return [
            r
            for r in out
            if (key is None or r.key == key)
            and (path is None or r.path == path)
            and (status is None or r.status == status)
        ]

    def peak(self, per_seconds: float, key: str | None = None, accepted: bool = True) -> int:
        """The most requests (of ``key``; ``accepted``: those not refused with 401/429) in any window."""
        rs = [r for r in self.records(key) if not accepted or r.status not in (401, 429)]
        return max_in_window((r.start for r in rs), per_seconds)

    def statuses(self, key: str | None = None) -> Counter[int]:
        return Counter(r.status for r in self.records(key))

    def reset(self) -> None:
        """Forget the records and the rate windows (not the faults)."""
        with self._lock:
            self._records.clear()
            self._windows.clear()

    def faults(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "fail_rate": self.fail_rate,
            "fail_status": self.fail_status,
            "down": self.down,
            "hang_rate": self.hang_rate,
            "hang_seconds": self.hang_seconds,
        }

    # -- the gate every request passes -----------------------------------------------------------------------
    def _admit(self, key: str) -> JSONResponse | None:
        """401/429 or None (counted in the key's window and in flight)."""
        spec = self.keys.get(key)
        if spec is None:
            shown = key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "***"
            return _error(401, f"Incorrect API key provided: {shown}.", "invalid_request_error", "invalid_api_key")
        now = time.monotonic()
        with self._lock:
            if spec.concurrency is not None and self._in_flight[key] >= spec.concurrency:
                return self._too_many(f"Concurrency limit reached: {spec.concurrency} in flight.", 1.0)
            if spec.requests is not None:
                window = self._windows.setdefault(key, deque())
                while window and window[0] <= now - spec.per_seconds:
                    window.popleft()
                if len(window) >= spec.requests:
                    wait = window[len(window) - spec.requests] + spec.per_seconds - now
                    return self._too_many(
                        f"Rate limit reached on requests per {spec.per_seconds:g}s: Limit {spec.requests}, "
                        f"Used {len(window)}, Requested 1. Please try again in {wait:.3f}s.",
                        wait,
                    )
                window.append(now)
            self._in_flight[key] += 1
        return None

    @staticmethod
    def _too_many(message: str, wait: float) -> JSONResponse:
        resp = _error(429, message, "requests", "rate_limit_exceeded")
        resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        resp.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        return resp

    def _delay(self) -> float:
        lat = self.latency
        if isinstance(lat, tuple | list):
            return self._random.uniform(float(lat[0]), float(lat[1]))
        return float(lat)

    async def _hang(self) -> None:
        end = time.monotonic() + self.hang_seconds
        while not self._closing and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def _gate(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if not path.startswith("/v1/"):
            return await call_next(request)  # the stand-in's own routes and served files
        start = time.time()
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        status = 500
        try:
            if key is None:
                resp: Response = _error(
                    401, "You didn't provide an API key.", "invalid_request_error", "missing_api_key"
                )
            else:
                resp = self._admit(key) or await self._serve(request, call_next, key)
            status = resp.status_code
            return resp
        finally:
            with self._lock:
                self._records.append(Record(key, path, start, time.time(), status))

    async def _serve(self, request: Request, call_next: Callable[[Request], Awaitable[Response]], key: str) -> Response:
        try:
            spec = self.keys[key]
            delay = self._delay()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.hang_rate and self._random.random() < self.hang_rate:
                await self._hang()
            if self.down:
                return _error(503, "The server is overloaded or not ready yet.", "server_error", "service_unavailable")
            if spec.status is not None:
                return _error(spec.status, f"This key answers {spec.status}.", "server_error", None)
            if self.fail_rate and self._random.random() < self.fail_rate:
                return _error(
                    self.fail_status, "The server had an error while processing your request.", "server_error", None
                )
            return await call_next(request)
        finally:
            with self._lock:
                self._in_flight[key] -= 1

    # -- the API ---------------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="provider stand-in", docs_url=None, redoc_url=None, openapi_url=None)
        app.middleware("http")(self._gate)

        @app.exception_handler(BadRequest)
        async def bad_request(_request: Request, exc: BadRequest) -> JSONResponse:
            return _error(400, str(exc), "invalid_request_error", "invalid_value", exc.param)

        @app.exception_handler(404)
        async def not_found(request: Request, _exc: Exception) -> JSONResponse:
            return _error(404, f"Invalid URL ({request.method} {request.url.path})", "invalid_request_error", None)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            ids = ["gpt-4o-mini", "gpt-image-1"]
            return {
                "object": "list",
                "data": [{"id": i, "object": "model", "created": 0, "owned_by": "stand-in"} for i in ids],
            }

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return self._chat(await _json(request))

        @app.post("/v1/images/generations")
        async def generations(request: Request) -> Response:
            body = await _json(request)
            prompt = _required_str(body, "prompt")
            size = parse_size(body.get("size"), DEFAULT_SIZE)
            images = [Image.new("RGB", size, colour(prompt, i)) for i in range(_n(body.get("n")))]
            return self._images(request, body, prompt, images, image_inputs=0)

        @app.post("/v1/images/edits")
        async def edits(request: Request) -> Response:
            form = await request.form()
            body = {k: v for k, v in form.items() if isinstance(v, str)}
            prompt = _required_str(body, "prompt")
            uploads = [u for name in ("image", "image[]") for u in form.getlist(name) if not isinstance(u, str)]
            if not uploads:
                raise BadRequest("image: required", "image")
            try:
                source = Image.open(io.BytesIO(await uploads[0].read())).convert("RGB")
            except (UnidentifiedImageError, OSError):
                raise BadRequest("image: not an image Pillow can read", "image") from None
            size = parse_size(body.get("size"), source.size)
            base = source.resize(size)
            images = [
                Image.blend(base, Image.new("RGB", size, colour(prompt, i)), 0.5) for i in range(_n(body.get("n")))
            ]
            return self._images(request, body, prompt, images, image_inputs=len(uploads))

        @app.get("/files/{name}")
        async def files(name: str) -> Response:
            found = self._files.get(name)
            if found is None:
                return _error(404, "no such file", "invalid_request_error", None)
            return Response(found[0], media_type=found[1])

        @app.get("/_standin/records")
        async def records() -> dict[str, Any]:
            return {"records": [asdict(r) for r in self.records()]}

        @app.post("/_standin/faults")
        async def set_faults(request: Request) -> dict[str, Any]:
            for name, value in (await request.json()).items():
                if name not in self.faults():
                    raise BadRequest(f"unknown fault {name!r}", name)
                setattr(self, name, tuple(value) if isinstance(value, list) else value)
            return self.faults()

        @app.post("/_standin/reset")
        async def reset() -> dict[str, Any]:
            self.reset()
            return {"reset": True}

        return app

    def _chat(self, body: dict[str, Any]) -> Response:
        model = _required_str(body, "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: a non-empty list is required", "messages")
        texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [_text_of(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else texts[-1]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        prompt_tokens = sum(_words(t) for t in texts)
        choices = []
        for i in range(_n(body.get("n"))):
            words = f"Stand-in reply to: {prompt}{f' #{i}' if i else ''}".split()
            finish = "stop"
            if isinstance(limit, int) and 0 < limit < len(words):
                words, finish = words[:limit], "length"
            choices.append((" ".join(words), finish))
        completion_tokens = sum(_words(t) for t, _ in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        ident = "chatcmpl-" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:24]
        head = {"id": ident, "created": int(time.time()), "model": model, "system_fingerprint": "fp_standin"}
        if not body.get("stream"):
            return JSONResponse(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "finish_reason": finish,
                            "logprobs": None,
                        }
                        for i, (text, finish) in enumerate(choices)
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(choices_: list[dict[str, Any]], **more: Any) -> str:
            return (
                "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices_, **more}) + "\n\n"
            )

        async def events() -> AsyncIterator[str]:
            for i, (text, finish) in enumerate(choices):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                for w, word in enumerate(text.split()):
                    piece = word if w == 0 else " " + word
                    yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
                yield chunk([{"index": i, "delta": {}, "finish_reason": finish}])
            if include_usage:
                yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _images(
        self, request: Request, body: Mapping[str, Any], prompt: str, images: list[Image.Image], image_inputs: int
    ) -> Response:
        fmt = str(body.get("output_format") or "png")
        if fmt not in _FORMATS:
            raise BadRequest(f"output_format must be one of {sorted(_FORMATS)}, not {fmt!r}", "output_format")
        how = body.get("response_format") or "b64_json"
        if how not in ("b64_json", "url"):
            raise BadRequest(f"response_format must be b64_json or url, not {how!r}", "response_format")
        data = []
        for img in images:
            raw = encode(img, fmt)
            if how == "url":
                name = f"{uuid.uuid4().hex}.{fmt}"
                with self._lock:
                    self._files[name] = (raw, f"image/{fmt}")
                    while len(self._files) > KEPT_FILES:
                        del self._files[next(iter(self._files))]
                data.append({"url": f"{str(request.base_url).rstrip('/')}/files/{name}"})
            else:
                data.append({"b64_json": base64.b64encode(raw).decode()})
        w, h = images[0].size
        text_tokens = _words(prompt)
        image_tokens = 65 * image_inputs
        output_tokens = len(images) * max(1, w * h // 1024)
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": data,
                "output_format": fmt,
                "size": f"{w}x{h}",
                "usage": {
                    "input_tokens": text_tokens + image_tokens,
                    "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
                    "output_tokens": output_tokens,
                    "total_tokens": text_tokens + image_tokens + output_tokens,
                },
            }
        )


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _required_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name}: a non-empty string is required", name)
    return value


def _n(value: Any) -> int:
    try:
        n = 1 if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"n must be an integer, not {value!r}", "n") from None
    if not 1 <= n <= MAX_IMAGES:
        raise BadRequest(f"n must be 1 to {MAX_IMAGES}, not {n}", "n")
    return n


def _latency(text: str) -> float | tuple[float, float]:
    low, sep, high = text.partition("-")
    return (float(low), float(high)) if sep else float(low)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--keys", default="test-key", help="k1,k2 or k1=4/1s,k2 (a key's own rate wins over --rate)")
    p.add_argument("--rate", default="", help="every key's limit, REQUESTS/[N]UNIT: 4/1s, 60/min (default none)")
    p.add_argument("--concurrency", type=int, default=None, help="every key's limit of requests in flight")
    p.add_argument("--latency", type=_latency, default=0.0, help="seconds, or LOW-HIGH drawn uniformly")
    p.add_argument("--fail", type=int, default=None, help="answer this status (503: the provider is down)")
    p.add_argument("--fail-rate", type=float, default=None, help="the share answered --fail (default: all)")
    p.add_argument("--hang-rate", type=float, default=0.0, help="the share of requests that hang")
    p.add_argument("--hang-seconds", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    default = KeySpec.parse(a.rate or None)
    keys: dict[str, KeySpec] = {}
    for item in filter(None, (s.strip() for s in a.keys.split(","))):
        name, _, rate = item.partition("=")
        spec = KeySpec.parse(rate) if rate else default
        keys[name] = KeySpec(spec.requests, spec.per_seconds, a.concurrency)
    fail_rate = a.fail_rate if a.fail_rate is not None else (1.0 if a.fail is not None else 0.0)
    standin = ProviderStandIn(
        keys,
        latency=a.latency,
        fail_rate=fail_rate,
        fail_status=a.fail or 503,
        hang_rate=a.hang_rate,
        hang_seconds=a.hang_seconds,
        host=a.host,
        port=a.port,
        seed=a.seed,
    )
    print(f"provider stand-in on http://{a.host}:{a.port}/v1, keys {', '.join(keys)}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(standin.app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=2)
    )
    # uvicorn re-raises the signal that stopped it once it has shut down: ignored here, so the summary prints.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        standin._closing = True
        print(json.dumps({"requests": len(standin.records()), "statuses": dict(standin.statuses())}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
