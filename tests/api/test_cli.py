"""The `zimage` CLI against the API: keys it makes are accepted, and `generate --api` follows the job to the end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from PIL import Image

from conftest import BIN
from tests.api.conftest import Api
from zimage_api.apikeys import KeyRing, parse_entry


def zimage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "zimage"), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_keys_create_prints_a_key_and_its_hashed_entry() -> None:
    out = zimage("keys", "create", "--tenant", "team-x", "--id", "k1", "--max-concurrent-jobs", "3")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    entry = out.stderr.split("--from-literal=k1=", 1)[1].strip().strip("'")
    assert key not in out.stderr  # only the hash goes into the Secret
    ring = KeyRing({"k1": parse_entry("k1", entry)})
    who = ring.authenticate(key)
    assert who is not None and who.tenant == "team-x" and who.max_concurrent_jobs == 3
    assert ring.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert json.loads(entry)["sha256"] != key
    bad = zimage("keys", "create", "--tenant", "Team X")
    assert bad.returncode == 2 and "tenant" in bad.stderr


def test_generate_against_the_api(api: Api, tmp_path: Path) -> None:
    out = zimage(
        "generate", "a red fox", "--api", api.url, "-o", str(tmp_path / "fox.png"), "--width", "96", "--height", "64",
        "-n", "2", "--seed", "7", env={"ZIMAGE_API_KEY": api.keys["a"]},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert paths == [tmp_path / "fox-0.png", tmp_path / "fox-1.png"]
    for p in paths:
        assert Image.open(p).size == (96, 64)
    assert "16/16" in out.stderr  # the progress bar was fed by the event stream
    assert "seed 7" in out.stderr
    unauthorized = zimage("generate", "x", "--api", api.url, env={"ZIMAGE_API_KEY": ""})
    assert unauthorized.returncode == 2 and "API key" in unauthorized.stderr
