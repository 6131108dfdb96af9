"""One log format for the operator, the worker and the API: one JSON object per line.

Prompts, object names, file names and exception messages reach the logs. ``json.dumps`` with ``ensure_ascii``
escapes every control character (newlines, ESC, NUL) and every non-ASCII line separator, so no input can start
a forged log line or drive a terminal; tracebacks go into one ``exc`` field instead of trailing lines.

Credentials never belong in a log line, but URLs carry them (a Redis URL's password, a signed image link, a
presigned S3 URL, an access log of either): ``redact`` masks them in every message and traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO, Any

_SECRETS = [
    # API keys (zk_<id>_<secret>): the id stays, it names the key without granting anything.
    (re.compile(r"\b(zk_[a-z0-9]{1,32}_)[A-Za-z0-9_-]{4,}"), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)(?!zk_[a-z0-9]{1,32}_\*\*\*)[^\s'\",]+"), r"\1***"),
    # Passwords in URLs: redis://user:password@host, https://user:password@host.
    (re.compile(r"(://[^/\s:@]*:)[^@/\s]+@"), r"\1***@"),
    # Signed links and presigned S3 URLs: whoever holds the signature holds the object until it expires.
    (
        re.compile(
            r"(?i)\b(signature|x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid|token|password)"
            r"=[^&\s'\"]+"
        ),
        r"\1=***",
    ),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


# Attributes every LogRecord has; anything else was passed with ``extra=`` and is worth keeping, except kopf's
# copy of its whole settings object on every object log line.
_SKIP = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "settings",
    "k8s_skip",
}


def escape(text: str) -> str:
    """``text`` with control and non-ASCII characters escaped as in JSON, without the quotes."""
    return json.dumps(text, ensure_ascii=True)[1:-1]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for k, v in record.__dict__.items():
            if k == "k8s_ref" and isinstance(v, dict):  # kopf's object loggers: which object this is about
                doc["object"] = f"{v.get('kind')} {v.get('namespace') or ''}/{v.get('name')}".replace(" /", " ")
            elif k not in _SKIP and not k.startswith("_"):
                doc[k] = v
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    """For people at a terminal (``zimage serve``): readable, but escaped the same way."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return escape(redact(super().format(record)))


def configure(level: int = logging.INFO, *, text: bool = False, stream: IO[str] | None = None) -> None:
    """Route every logger (ours, kopf's, uvicorn's, warnings) through one escaped formatter on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Loggers configured earlier with their own handlers (uvicorn's default config sets uvicorn.access to
    # propagate=False) would bypass the formatter: send them to the root handler too.
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and (logger.handlers or not logger.propagate):
            logger.handlers.clear()
            logger.propagate = True
    logging.captureWarnings(True)
