"""Short-lived signed image URLs, so an image link works in a browser or an OpenAI client without the API key.

The signature covers the path and the expiry; job names are per tenant, so a URL opens one tenant's image.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import urlencode


class UrlSigner:
    def __init__(self, key: str, ttl_seconds: int) -> None:
        # A random key per process is fine for one replica; several replicas must share ZIMAGE_API_URL_SIGNING_KEY.
        self._key = (key or secrets.token_hex(32)).encode()
        self.ttl = ttl_seconds

    def _mac(self, path: str, expires: int) -> str:
        return hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.ttl)
        return f"{path}?{urlencode({'expires': expires, 'signature': self._mac(path, expires)})}"

    def verify(self, path: str, expires: int | None, signature: str | None, now: float | None = None) -> bool:
        if expires is None or not signature or expires < (now or time.time()):
            return False
        return hmac.compare_digest(self._mac(path, expires), signature)
