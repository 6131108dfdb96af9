"""`zimage dev up`'s worker supervision: workers per pool as pools come and go, dead ones restarted with backoff.

Real processes stand in for workers (`false`: one that dies at once), so no Redis or cluster is needed here;
tests/integration/test_quickstart.py runs the whole developer mode against the test bed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from zimage_api import dev


def pool(name: str, source: str = "Tongyi-MAI/Z-Image-Turbo") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"model": {"variant": "turbo", "source": source, "revision": "abc"}},
    }


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dev.DevStack:
    monkeypatch.setattr(dev, "_exe", lambda name: "false")
    said: list[str] = []
    s = dev.DevStack(["team-a"], tmp_path, workers=2, redis_url="redis://127.0.0.1:1/0", say=said.append)
    (tmp_path / "logs").mkdir()
    s.said = said  # type: ignore[attr-defined]
    return s


def test_workers_follow_the_pools_and_get_what_the_operator_would_give(stack: dev.DevStack) -> None:
    stack.sync_pools([pool("turbo"), pool("base")], now=0.0)
    workers = sorted(n for n in stack.children if n.startswith("worker/"))
    assert workers == [f"worker/team-a/{p}/{i}" for p in ("base", "turbo") for i in (0, 1)]
    env = stack.children["worker/team-a/turbo/1"].env
    assert env["ZIMAGE_QUEUE"] == "team-a/turbo" and env["ZIMAGE_WORKER_NAME"] == "dev-turbo-1"
    assert (env["ZIMAGE_MODEL_SOURCE"], env["ZIMAGE_VARIANT"], env["ZIMAGE_REVISION"]) == (
        "Tongyi-MAI/Z-Image-Turbo",
        "turbo",
        "abc",
    )
    assert env["ZIMAGE_STORAGE_URL"] == stack.images.as_uri()  # where dev mode's API reads them
    stack.model_source = "tiny-random"
    assert stack.worker_env(pool("x"), 0)["ZIMAGE_MODEL_SOURCE"] == "tiny-random"
    stack.sync_pools([pool("base")], now=1.0)
    assert sorted(n for n in stack.children if n.startswith("worker/")) == [
        "worker/team-a/base/0",
        "worker/team-a/base/1",
    ]
    assert "stopped worker/team-a/turbo/0 (its ModelDeployment is gone)" in stack.said  # type: ignore[attr-defined]
    stack.stop()


def test_a_dead_worker_is_restarted_with_backoff(stack: dev.DevStack) -> None:
    stack.workers = 1
    stack.sync_pools([pool("turbo")], now=0.0)
    child = stack.children["worker/team-a/turbo/0"]
    assert child.proc is not None and child.proc.wait(10) == 1  # `false` dies at once
    first = child.proc
    # The death is seen at now=0 either way: by the first pass if `false` was already gone, else by this one
    stack.sync_pools([pool("turbo")], now=0.0)
    assert child.failures == 1 and child.next_start > 0.0 and child.proc is first  # waiting out its backoff
    stack.sync_pools([pool("turbo")], now=child.next_start - 0.01)
    assert child.proc is first  # still waiting
    stack.sync_pools([pool("turbo")], now=child.next_start + 0.01)
    assert child.proc is not first  # started again
    child.proc.wait(10)
    stack.sync_pools([pool("turbo")], now=1000.0)
    assert child.failures == 2 and child.next_start - 1000.0 >= 1.0  # the backoff grows with the failures
    stack.stop()


def test_remote_and_function_pools_run_what_their_pods_would(
    stack: dev.DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes come from the operator's own rendering: a remote pool gets a forwarder with the provider's
    settings and a private copy of its keys Secret; a function pool a worker running its entry point."""
    monkeypatch.setattr(dev, "_exe", lambda name: name)
    monkeypatch.delenv("MODELS_DIR", raising=False)
    stack.read_secret = lambda ns, name: {"k1": "sk-one", "k2": "sk-two"} if (ns, name) == ("team-a", "keys") else {}
    remote = {
        "metadata": {"name": "provider-a", "namespace": "team-a"},
        "spec": {
            "backend": "remote",
            "remote": {"api": "images", "baseUrl": "https://api.example/v1", "model": "gpt-image-1",
                       "keysSecret": "keys", "limits": {"requestsPerWindow": 4, "windowSeconds": 1}},
            "fallbacks": {"unavailable": ["local"]},
        },
    }  # fmt: skip
    argv, env = stack.worker_process(remote, 0)
    assert argv == ["zimage-forwarder"]
    assert (env["ZIMAGE_REMOTE_BASE_URL"], env["ZIMAGE_REMOTE_REQUESTS_PER_WINDOW"]) == ("https://api.example/v1", "4")
    assert env["ZIMAGE_FALLBACKS"] == '{"unavailable":["local"]}' and env["ZIMAGE_QUEUE"] == "team-a/provider-a"
    keys = Path(env["ZIMAGE_REMOTE_KEYS_DIR"])
    assert {p.name: p.read_text() for p in keys.iterdir()} == {"k1": "sk-one", "k2": "sk-two"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in keys.iterdir())
    function = {
        "metadata": {"name": "compose", "namespace": "team-a"},
        "spec": {"backend": "function", "function": {"entryPoint": "builtin:compose"}},
    }
    argv, env = stack.worker_process(function, 0)
    assert argv == ["zimage-worker"] and (env["ZIMAGE_ENGINE"], env["ZIMAGE_FUNCTION"]) == (
        "function",
        "builtin:compose",
    )
    assert env["ZIMAGE_STORAGE_URL"] == stack.images.as_uri() and "MODELS_DIR" not in env


def test_cpu_bound_pools_run_below_the_io_bound_ones(stack: dev.DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A function pool's processes (and a model's, here on a CPU) start 10 nicer than this process; a forwarder
    keeps this process's priority, so compose steps' CPU does not become its event-loop lag."""
    monkeypatch.setattr(dev, "_exe", lambda name: "sleep")
    stack.read_secret = lambda ns, name: {"k1": "sk-one"}
    function = {
        "metadata": {"name": "compose", "namespace": "team-a"},
        "spec": {"backend": "function", "function": {"entryPoint": "builtin:compose"}},
    }
    remote = {
        "metadata": {"name": "llm", "namespace": "team-a"},
        "spec": {
            "backend": "remote",
            "remote": {"api": "chat", "baseUrl": "http://127.0.0.1:1/v1", "model": "m", "keysSecret": "keys",
                       "limits": {"requestsPerWindow": 4, "windowSeconds": 1}},
        },
    }  # fmt: skip
    stack.workers = 1
    monkeypatch.setattr(dev.Child, "start", _start_sleeping(dev.Child.start))
    stack.sync_pools([function, remote, pool("turbo")], now=0.0)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        nice = {n: os.getpriority(os.PRIO_PROCESS, c.proc.pid) for n, c in stack.children.items() if c.proc}
        assert nice == {
            "worker/team-a/compose/0": min(mine + 10, 19),
            "worker/team-a/turbo/0": min(mine + 10, 19),
            "worker/team-a/llm/0": mine,
        }
    finally:
        stack.stop()


def _start_sleeping(start: Any) -> Any:
    def run(child: dev.Child) -> None:
        child.argv = ["sleep", "30"]  # a live process to read the priority of
        start(child)

    return run
