"""`zimage serve` and `zimage generate` stopped from outside (SIGTERM as `kill %1` sends, SIGINT, SIGKILL) leave no
redis-server and no temporary directory behind. Each runs with its own TMPDIR, so what it leaves is visible."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import BIN, wait_for
from zimage_queue.server import free_port


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live processes whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append((int(stat.parent.name), name))
    return out


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def ours(tmp: Path) -> list[str]:
    """What zimage left in its TMPDIR (torch keeps a compile cache there too, which is not ours)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("zimage-"))


class Cli:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp / "tmp"
        self.tmp.mkdir()
        self.log = tmp / "zimage.log"
        self.proc: subprocess.Popen[str] | None = None
        self.redis: list[int] = []

    def start(self, *args: str, stderr: int | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, "TMPDIR": str(self.tmp)}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "zimage"), *args], env=env, stdout=log, stderr=stderr or log, text=True
            )
        return self.proc

    def redis_child(self) -> int:
        assert self.proc is not None
        [pid] = [p for p, name in children(self.proc.pid) if name == "redis-server"]
        self.redis.append(pid)
        return pid

    def stop(self) -> None:
        """Whatever a failed test left running."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        for pid in self.redis:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cli(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cli]:
    c = Cli(tmp_path)
    yield c
    c.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(c.log.read_text()[-4000:])


def serving(cli: Cli) -> str:
    port = free_port()
    proc = cli.start("serve", "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"zimage serve exited with {proc.returncode}:\n{cli.log.read_text()}"
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, timeout=120, interval=0.2, what="zimage serve")
    return url


# SIGTERM: what a shell reports for a process the signal ended. SIGINT (Ctrl-C): uvicorn's own convention,
# a server stopped by hand exits cleanly.
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 0)])
def test_serve_stopped_with_a_signal_leaves_nothing(cli: Cli, sig: signal.Signals, code: int) -> None:
    serving(cli)
    redis_pid = cli.redis_child()
    assert [n.rsplit("-", 1)[0] for n in ours(cli.tmp)] == ["zimage-redis", "zimage-serve"]
    assert cli.proc is not None
    cli.proc.send_signal(sig)
    assert cli.proc.wait(60) == code
    assert "Traceback" not in cli.log.read_text()
    assert not alive(redis_pid), "redis-server outlived zimage serve"
    assert ours(cli.tmp) == []


def test_serve_killed_outright_takes_its_redis_along(cli: Cli) -> None:
    serving(cli)
    redis_pid = cli.redis_child()
    assert cli.proc is not None
    cli.proc.kill()  # no cleanup can run: the kernel tells the child (PR_SET_PDEATHSIG)
    cli.proc.wait(10)
    wait_for(lambda: not alive(redis_pid), timeout=10, what="redis-server to follow its parent")


def test_generate_stopped_mid_run_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    # 100 steps of 512x512 take the tiny model half a minute: the job is still running when the signal comes.
    proc = cli.start(
        "generate", "a red fox", "--width", "512", "--height", "512", "--steps", "100", "-o", str(out),
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # blocks until the worker reports the job started
        seen.append(line)
        if line.startswith("running on "):
            break
    else:
        raise AssertionError(f"zimage generate ended before its job started:\n{''.join(seen)}")
    redis_pid = cli.redis_child()
    assert [n.rsplit("-", 1)[0] for n in ours(cli.tmp)] == ["zimage-images", "zimage-redis"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "100/100" not in err  # the job was cancelled, not waited for
    assert not alive(redis_pid), "redis-server outlived zimage generate"
    assert ours(cli.tmp) == []
    assert not out.exists()
