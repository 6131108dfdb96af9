"""A throwaway Redis Cluster on loopback (three masters, three replicas) for tests and benchmarks.

Six ``redis-server --cluster-enabled yes`` processes, each in its own directory, joined by
``redis-cli --cluster create ... --cluster-replicas 1``. Like ``RedisServer``, each process is told to die with
its parent. ``failover`` (``CLUSTER FAILOVER`` on a replica) and ``kill`` (SIGKILL of a master) are the two
ways a master changes that the failover tests drive.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from zimage_queue.server import _die_with_parent, find_server_binary

NODE_TIMEOUT_MS = 2000
# A node also listens on its port + 10000 (the cluster bus), so its port must be at most 55535.
_PORTS = (20000, 55000)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A loopback port that is free, and whose cluster bus port (+10000) is free too."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(*_PORTS)
        if port not in taken and port + 10000 not in taken and _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes] | None = None
    password: str | None = None

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, socket_connect_timeout=0.5, socket_timeout=5, decode_responses=True, password=self.password
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    """``with LocalCluster() as c: c.url`` - a private cluster that is gone when the block ends."""

    def __init__(
        self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = NODE_TIMEOUT_MS, password: str | None = None
    ) -> None:
        """``password``: every node's ``requirepass`` (and ``masterauth``, for its replicas)."""
        self.password = password
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self._tmp = tempfile.TemporaryDirectory(prefix="zimage-cluster-")
        taken: set[int] = set()
        self.nodes: list[Node] = []
        for _ in range(masters * (1 + replicas)):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            self.nodes.append(Node(port, password=password))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.name for n in self.nodes[: self.masters]) + "/"

    def _start_node(self, node: Node) -> None:
        d = Path(self._tmp.name) / str(node.port)
        d.mkdir(exist_ok=True)
        cmd = [
            find_server_binary(),
            "--port",
            str(node.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(d / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
        ]
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        node.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent()
        )

    def start(self, timeout: float = 30.0) -> LocalCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli not found (apt-get install redis-server, or redis-tools)")
        for n in self.nodes:
            self._start_node(n)
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            self._wait_ping(n, deadline)
        create = [cli, "--cluster", "create", *(n.name for n in self.nodes)]
        subprocess.run(
            [*create, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "REDISCLI_AUTH": self.password} if self.password else None,
        )
        self.wait_healthy(timeout=max(1.0, deadline - time.monotonic()))
        return self

    @staticmethod
    def _wait_ping(node: Node, deadline: float) -> None:
        c = node.client()
        try:
            while True:
                try:
                    c.ping()
                    return
                except redis.ConnectionError:
                    if not node.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {node.port}") from None
                    time.sleep(0.02)
        finally:
            c.close()

    def _info(self, node: Node) -> dict[str, str]:
        c = node.client()
        try:
            raw = str(c.execute_command("CLUSTER", "INFO"))
        finally:
            c.close()
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)

    def roles(self) -> dict[int, str]:
        """port -> "master" or "slave", for the nodes still running, as each reports itself."""
        out: dict[int, str] = {}
        for n in self.nodes:
            if not n.alive():
                continue
            c = n.client()
            try:
                out[n.port] = str(c.execute_command("ROLE")[0])
            except redis.RedisError:
                continue
            finally:
                c.close()
        return out

    def healthy(self, replicated: bool = True) -> bool:
        """Every live node sees the cluster ok with all slots served by live masters; with ``replicated``, every
        master also has its replicas attached and in sync."""
        live = [n for n in self.nodes if n.alive()]
        try:
            infos = [self._info(n) for n in live]
            roles = [(n, n.client().execute_command("ROLE")) for n in live]
        except redis.RedisError:
            return False
        ok = all(i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384" for i in infos)
        masters = [role for _n, role in roles if str(role[0]) == "master"]
        if not ok or len(masters) != self.masters:
            return False
        if replicated:
            synced = [role for _n, role in roles if str(role[0]) == "slave" and str(role[3]) == "connected"]
            return len(synced) == self.masters * self.replicas and all(len(m[2]) >= self.replicas for m in masters)
        return True

    def wait_healthy(self, timeout: float = 30.0, replicated: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(replicated):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not healthy after {timeout}s: {self.roles()}")
            time.sleep(0.1)

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def master_of(self, key: str) -> Node:
        """The live master serving ``key``'s slot, as the cluster reports it now."""
        for n in self.nodes:
            if not n.alive():
                continue
            c = n.client()
            try:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_replicas in c.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        return self.node(int(master[1]))
            except redis.RedisError:
                continue
            finally:
                c.close()
        raise RuntimeError(f"no live node knows the master of {key!r}")

    def replica_of(self, master: Node) -> Node:
        c = master.client()
        try:
            role = c.execute_command("ROLE")
        finally:
            c.close()
        for host_port in role[2]:
            port = int(host_port[1])
            if self.node(port).alive():
                return self.node(port)
        raise RuntimeError(f"master {master.name} has no live replica")

    def failover(self, replica: Node, timeout: float = 20.0) -> None:
        """A manual failover: the replica and its master swap roles without losing a write."""
        c = replica.client()
        try:
            c.execute_command("CLUSTER", "FAILOVER")
            deadline = time.monotonic() + timeout
            while str(c.execute_command("ROLE")[0]) != "master":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{replica.name} did not become master")
                time.sleep(0.05)
        finally:
            c.close()

    def kill(self, node: Node) -> None:
        """SIGKILL: no goodbye, no last write replicated; the cluster elects its replica after the node timeout."""
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def restart(self, node: Node) -> None:
        """Start a stopped node again on its port and directory: it rejoins, as a replica of whoever took over."""
        if node.alive():
            return
        self._start_node(node)
        self._wait_ping(node, time.monotonic() + 10)

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(5)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
            n.proc = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
