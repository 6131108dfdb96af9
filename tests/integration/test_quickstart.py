"""docs/quickstart.md's bash blocks, run as written (a free port for 8080, a fresh namespace for `zimage`).

The first line of the local part is the README's install command, which CI runs verbatim; here it is skipped
and the test's own environment stands in. The test bed has no kubelet: after `helm install`, the operator and
a worker run as local processes in place of their pods.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, Kube, Processes, start_operator, start_worker
from zimage_queue import keys
from zimage_queue.server import RedisServer, free_port

DOC = REPO / "docs" / "quickstart.md"
INSTALL = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[worker]'"


def blocks(tag: str) -> list[str]:
    return re.findall(rf"```bash {tag}\n(.*?)\n```", DOC.read_text(), re.S)


def workdir(tmp: Path) -> Path:
    """A scratch directory that looks like the repository root: .venv, docs/, charts/."""
    (tmp / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp / "docs").symlink_to(REPO / "docs")
    (tmp / "charts").symlink_to(REPO / "charts")
    return tmp


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{script}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    return out.stdout


def test_local_quickstart(tmp_path: Path) -> None:
    first, api = blocks("local")
    assert first.splitlines()[0] == INSTALL  # and the README runs it verbatim (tests/unit/test_readme.py)
    assert INSTALL in (REPO / "README.md").read_text()
    cwd = workdir(tmp_path)
    port = str(free_port())
    script = "\n".join(first.splitlines()[1:]) + "\n" + api.replace("8080", port)
    bash(script, cwd, dict(os.environ))
    for name in ("fox.png", "fox-api.png", "fox-cli.png"):
        with Image.open(cwd / name) as img:
            assert img.size == (512, 512), name


@pytest.mark.kube
def test_cluster_quickstart(crds: Kube, tmp_path: Path, processes: Processes) -> None:
    (install,) = blocks("cluster-install")
    (run,) = blocks("cluster-run")
    ns = f"quickstart-{os.getpid()}"

    def local(script: str) -> str:
        return script.replace("-n zimage", f"-n {ns}")

    cwd = workdir(tmp_path)
    try:
        with RedisServer() as srv:
            out = bash(local(install), cwd, crds.env)
            assert "deployment.apps/zimage-operator-operator" in out and "deployment.apps/zimage-operator-api" in out
            # Stand-ins for the pods a kubelet would run.
            start_operator(processes, crds, srv.url, ns)
            start_worker(processes, srv.url, keys.queue_name(ns, "z-image-turbo"), tmp_path / "images")
            out = bash(local(run), cwd, crds.env)
            assert re.search(r"red-fox\s+z-image-turbo\s+Succeeded\s+8/8", out), out
    finally:
        processes.stop_all()  # before the namespace goes; the fixture shows the logs if the test failed
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.kube
def test_dev_mode_quickstart(crds: Kube, tmp_path: Path) -> None:
    """The chart's default install, `zimage dev up` as documented, then jobs through kubectl and the API: both
    of the OpenAI route's response formats and the signed link return the image the local workers made."""
    import base64
    import io
    import signal
    import threading

    import httpx

    from conftest import wait_for

    (install,) = blocks("cluster-install")
    (up,) = blocks("dev-up")
    (run,) = blocks("dev-run")
    ns = f"devmode-{os.getpid()}"
    port = str(free_port())

    def local(script: str) -> str:
        return script.replace("-n zimage", f"-n {ns}").replace("8080", port)

    cwd = workdir(tmp_path)
    bash(local(install), cwd, crds.env)
    # `... &` in the docs: here the test holds the process, to read its output and stop it.
    argv = local(up).removesuffix("&").split()
    dev = subprocess.Popen(argv, cwd=cwd, env=crds.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(dev.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: any("ready" in line for line in lines), timeout=60, what="zimage dev up to start")

        def api_ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(api_ready, timeout=60, what="the API")
        bash(local(run), cwd, crds.env)
        with Image.open(cwd / "fox-dev.png") as img:
            assert img.size == (512, 512)
        assert sum("started worker/" in line for line in lines) == 2, lines

        headers = {"Authorization": "Bearer zk_dev_local-development-key"}
        body = {"prompt": "a red fox", "size": "256x256"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
            b64 = c.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
            assert b64.status_code == 200, b64.text
            with Image.open(io.BytesIO(base64.b64decode(b64.json()["data"][0]["b64_json"]))) as img:
                assert img.size == (256, 256)
            linked = c.post("/v1/images/generations", json={**body, "response_format": "url"})
            assert linked.status_code == 200, linked.text
            url = linked.json()["data"][0]["url"]
        fetched = httpx.get(url, timeout=30)  # the signed link, with no key
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(fetched.content)) as img:
            assert img.size == (256, 256)
        tampered = httpx.get(url.replace("signature=", "signature=0"), timeout=30)
        assert tampered.status_code in (401, 403, 404)
        images = list((cwd / ".zimage-dev" / "images").rglob("*.png"))
        assert len(images) >= 3  # the ImageJob's, the CLI's and the API's two, in dev mode's store
    finally:
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            dev.kill()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        print("\n".join(lines))
    assert dev.returncode == 128 + signal.SIGTERM
