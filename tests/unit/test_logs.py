"""One JSON object per log line whatever the input, and no credentials in any of them (zimage_queue.logs)."""

from __future__ import annotations

import io
import logging

import pytest

from conftest import json_log_lines
from zimage_queue import logs

HOSTILE = 'fox\n{"level":"CRITICAL","msg":"forged"}\r\x1b[2J\x1b[31mred\x00\u2028\u2029\x85\ttab "quoted" \\ back'


def records(out: io.StringIO) -> list[dict[str, object]]:
    return json_log_lines(out.getvalue())


def test_control_characters_stay_inside_one_record(captured_logs: io.StringIO) -> None:
    log = logging.getLogger("zimage_worker.loop")
    log.warning("job %s failed on its input: %s", "ns/fox", HOSTILE)
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        log.exception("attempt %d failed", 2)
    first, second = records(captured_logs)
    assert first["msg"] == f"job ns/fox failed on its input: {HOSTILE}"  # escaped, not lost
    assert first["level"] == "WARNING" and first["logger"] == "zimage_worker.loop"
    assert second["msg"] == "attempt 2 failed" and HOSTILE in str(second["exc"])
    assert str(second["exc"]).startswith("Traceback") and "ValueError" in str(second["exc"])


def test_kopf_object_extras_become_one_field(captured_logs: io.StringIO) -> None:
    ref = {"kind": "ImageJob", "namespace": "team-a", "name": "fox", "uid": "u"}
    logging.getLogger("kopf.objects").info("Handler 'admit' succeeded.", extra={"k8s_ref": ref, "settings": object()})
    [rec] = records(captured_logs)
    assert rec["object"] == "ImageJob team-a/fox" and "settings" not in rec and "k8s_ref" not in rec


@pytest.mark.parametrize(
    ("secret_text", "kept"),
    [
        ("Authorization: Bearer zk_teama_Zx8-s3cr3tS3cr3tS3cr3t_x", "zk_teama_***"),
        ("key zk_a1_AbCdEfGhIjKlMnOpQrStUv rejected", "zk_a1_***"),
        ("Authorization: Bearer eyJhbGciOi.secretjwt", "Bearer ***"),
        ("Redis unavailable at redis://default:hunter2-pw@redis:6379/0", "redis://default:***@redis"),
        ("GET /v1/jobs/j/images/0?expires=1795450000&signature=9f86d081884c7d65 HTTP/1.1", "signature=***"),
        (
            "https://s3/b/k.png?X-Amz-Credential=AKIAEXAMPLE%2F2026&X-Amz-Signature=deadbeefcafe&X-Amz-Expires=60",
            "X-Amz-Expires=60",
        ),
    ],
)
def test_credentials_are_masked(captured_logs: io.StringIO, secret_text: str, kept: str) -> None:
    logging.getLogger("x").info("%s", secret_text)
    try:
        raise ConnectionError(secret_text)
    except ConnectionError:
        logging.getLogger("x").exception("failed")
    msg, exc = records(captured_logs)
    for leaked in ("s3cr3t", "AbCdEfGh", "secretjwt", "hunter2", "9f86d081", "AKIAEXAMPLE", "deadbeef"):
        assert leaked not in str(msg["msg"]) and leaked not in str(exc["exc"])
    assert kept in str(msg["msg"]) and kept in str(exc["exc"])


def test_text_format_for_terminals_is_escaped_too() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.TextFormatter())
    record = logging.LogRecord("zimage", logging.INFO, __file__, 1, "prompt %s", (HOSTILE,), None)
    handler.emit(record)
    line = out.getvalue()
    assert line.count("\n") == 1 and line.isascii() and "\x1b" not in line and "\\u001b[31mred" in line
