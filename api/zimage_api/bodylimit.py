"""A cap on request bodies, however they are sent: a declared Content-Length over the cap is refused before a
byte is read, and a body without one (``Transfer-Encoding: chunked``) is counted as it arrives and refused the
moment it passes the cap. Either way the client gets a 413 in the API's error shape and the connection closes;
the server never holds more than the cap of one request.

Pure ASGI, so it sees the body as the server hands it over, message by message, before anything buffers it.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zimage_api.errors import error_body

CODE = "too_large"


class BodyTooLarge(HTTPException):
    """Raised out of ``receive`` when the body passes the cap. An HTTPException, so FastAPI's body parsing lets
    it through as is (it wraps anything else in a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"request body over the limit of {limit} bytes"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return

        received = 0
        tripped = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, tripped
            if tripped:  # whoever asks again gets no more of this body
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    tripped = True
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped and not started:
                return  # the app's own answer to the aborted read; ours goes out below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if started:
                raise
        if tripped and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(413, too_large_message(self.max_bytes), code=CODE)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is never read: the connection cannot carry another request.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
