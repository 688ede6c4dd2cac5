"""Private Redis servers on loopback ports, for the Redis store's tests.

Started from the Debian packages' binaries with no persistence, so each start is
empty; tests can stop and start one again on the same port to play an outage.
Beside one server: a primary with a replica watched by three Sentinels
(`SentinelSet`), and a Redis Cluster of three primaries (`ClusterSet`), built as
an admin would, with `redis-cli --cluster create`.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from .ports import free_port

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_SENTINEL = "/usr/bin/redis-sentinel"
REDIS_CLI = "/usr/bin/redis-cli"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if predicate():
                return
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


class _Process:
    """A redis-server (or redis-sentinel) child: started, awaited, stopped."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], timeout: float) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"{argv[0]} exited: {err}")
            if self._pong():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{argv[0]} did not answer on port {self.port}")

    def _pong(self) -> bool:
        """Up: it answers PING, even if only to say that it wants a password."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to hand anything over."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._close()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(Exception):
            if self.proc.stderr:
                self.proc.stderr.close()
        self.proc = None


class RedisServer(_Process):
    """One redis-server; `args` adds options (a replica, ACL users, TLS, Cluster mode)."""

    def __init__(self, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.args = list(args)
        # A replica writes the primary's snapshot to its directory: not the tests' own.
        self.dir = tempfile.TemporaryDirectory(prefix="spamgate-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def state_lines(self) -> list[str]:
        """Where [state] finds this server."""
        return [f'redis = "{self.url}"']

    def start(self, timeout: float = 10.0) -> None:
        self._spawn(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
                "--dir", self.dir.name,
                *self.args,
            ],
            timeout,
        )  # fmt: skip

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)  # type: ignore[arg-type]


class Sentinel(_Process):
    """One redis-sentinel watching `service` (its config file is its own: it rewrites it)."""

    def __init__(
        self, directory: Path, service: str, primary: int, quorum: int, extra: str = ""
    ) -> None:
        self.port = free_port()
        self.myid = secrets.token_hex(20)
        self.conf = directory / f"sentinel-{self.port}.conf"
        self.service = service
        self.head = (
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f'dir "{directory}"\n'
            "loglevel warning\n"
            f"sentinel monitor {service} 127.0.0.1 {primary} {quorum}\n"
            # Low so that a test's failover takes seconds, not the default minute.
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 4000\n"
            f"sentinel parallel-syncs {service} 1\n"
            f"sentinel myid {self.myid}\n"
            f"{extra}"
        )
        self.conf.write_text(self.head)

    def introduce(self, replicas: Sequence[int], others: Sequence[Sentinel]) -> None:
        """Write what Sentinels would learn by themselves in 10 s (INFO) and 2 s (hello)."""
        lines = [f"sentinel known-replica {self.service} 127.0.0.1 {port}\n" for port in replicas]
        lines += [
            f"sentinel known-sentinel {self.service} 127.0.0.1 {o.port} {o.myid}\n"
            for o in others
            if o is not self
        ]
        self.conf.write_text(self.head + "".join(lines))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._spawn([REDIS_SENTINEL, str(self.conf)], timeout)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


class SentinelSet:
    """A primary, one replica and three Sentinels (quorum 2), all on loopback.

    `start()` returns once every Sentinel knows the replica and the two other
    Sentinels, so that a failover can be agreed on. `wait_failover()` waits for
    the Sentinels to name another primary after the test killed this one.
    """

    SERVICE = "spamgate-test"

    def __init__(self, sentinels: int = 3, primary_args: Sequence[str] = ()) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="spamgate-sentinel-")
        self.primary = RedisServer(args=primary_args)
        self.replica = RedisServer(
            args=[*primary_args, "--replicaof", "127.0.0.1", str(self.primary.port)]
        )
        quorum = min(2, sentinels)
        self.sentinels = [
            Sentinel(Path(self.dir.name), self.SERVICE, self.primary.port, quorum)
            for _ in range(sentinels)
        ]
        for s in self.sentinels:
            s.introduce([self.replica.port], self.sentinels)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def state_lines(self) -> list[str]:
        return [
            "sentinels = [" + ", ".join(f'"{a}"' for a in self.addresses) + "]",
            f'service_name = "{self.SERVICE}"',
        ]

    def start(self, timeout: float = 20.0) -> SentinelSet:
        self.primary.start()
        self.replica.start()
        wait_for(self._replica_in_sync, timeout, "the replica to sync")
        for s in self.sentinels:
            s.start()
        others = len(self.sentinels) - 1
        wait_for(lambda: self._sentinels_ready(others), timeout, "the sentinels to meet")
        return self

    def _replica_in_sync(self) -> bool:
        info = self.replica.client().info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self, others: int) -> bool:
        for s in self.sentinels:
            state = s.client().sentinel_master(self.SERVICE)
            if int(state["num-other-sentinels"]) < others or int(state["num-slaves"]) < 1:
                return False
        return True

    def named_primary(self) -> int:
        """The port of the primary the first live Sentinel names."""
        for s in self.sentinels:
            if s.running:
                with contextlib.suppress(redis.RedisError):
                    _, port = s.client().sentinel_get_master_addr_by_name(self.SERVICE)
                    return int(port)
        raise RuntimeError("no sentinel answers")

    def wait_failover(self, timeout: float = 20.0) -> RedisServer:
        """The replica, once every live Sentinel names it and it takes writes."""
        old = self.primary.port

        def promoted() -> bool:
            ports = {
                int(s.client().sentinel_get_master_addr_by_name(self.SERVICE)[1])
                for s in self.sentinels
                if s.running
            }
            return ports == {self.replica.port} and self._is_primary(self.replica)

        wait_for(promoted, timeout, f"the sentinels to replace the primary on {old}")
        return self.replica

    @staticmethod
    def _is_primary(server: RedisServer) -> bool:
        return server.client().info("replication")["role"] == "master"

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.primary.stop()
        self.dir.cleanup()


class ClusterSet:
    """A Redis Cluster of three primaries (no replicas), made by `redis-cli --cluster create`."""

    def __init__(self, nodes: int = 3, args: Sequence[str] = ()) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="spamgate-cluster-")
        self.nodes = []
        for n in range(nodes):
            # The cluster bus needs a port of its own; by default port + 10000,
            # which may be taken or out of range: give it one we know is free.
            self.nodes.append(
                RedisServer(
                    args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"{self.dir.name}/nodes-{n}.conf",
                        "--cluster-node-timeout", "2000",
                        "--cluster-port", str(free_port()),
                        "--dir", self.dir.name,
                        *args,
                    ]
                )
            )  # fmt: skip

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def state_lines(self) -> list[str]:
        return ["cluster = [" + ", ".join(f'"{a}"' for a in self.addresses) + "]"]

    def start(self, timeout: float = 20.0) -> ClusterSet:
        for node in self.nodes:
            node.start()
        result = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *self.addresses, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-500:]}")
        wait_for(self._ok, timeout, "the cluster to agree on its slots")
        return self

    def _ok(self) -> bool:
        for node in self.nodes:
            info = node.client().cluster("INFO")
            if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != len(self.nodes):
                return False
        return True

    def node_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s hash slot now."""
        client = self.nodes[0].client()
        slot = client.cluster("KEYSLOT", key)
        for start, end, primary, *_ in client.cluster("SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise RuntimeError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.dir.cleanup()
