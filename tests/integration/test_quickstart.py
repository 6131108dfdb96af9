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
