"""A real Ray cluster on 127.0.0.1 for the tests: a head and more nodes, each `ray start --block` in a process group
of its own (one CPU each), so that a node can be lost by killing its processes, as a machine going down would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Quick to notice a lost node (the default takes ~30 s), no usage report, no sign-in on the local cluster.
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "500",
       "RAY_health_check_failure_threshold": "6", "RAY_health_check_initial_delay_ms": "0"}
RAY = Path(sys.executable).with_name("ray")
COMMON = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`nodes` nodes of `cpus` CPUs each; `address` for `--ray`; `kill(n)` loses node n (0 is the head)."""

    def __init__(self, nodes: int = 2, cpus: int = 1):
        os.environ.update(ENV)  # the driver (the test's process) reads some of them too
        # a short temporary folder: Ray's socket paths must stay under the 107-character limit
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.address = f"127.0.0.1:{_free_port()}"
        self.processes: list[subprocess.Popen] = []
        self.common = [*COMMON, f"--num-cpus={cpus}"]
        self._start(["--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false",
                     f"--temp-dir={self.temp}", *self.common])
        self._wait(lambda: subprocess.run([str(RAY), "status", f"--address={self.address}"], capture_output=True,
                                          env={**os.environ, **ENV}).returncode == 0, "the head")
        for _ in range(nodes - 1):
            self._start([f"--address={self.address}", *self.common])
        self._wait(lambda: self._alive() == nodes, f"{nodes} nodes")

    def _start(self, args: list[str]) -> None:
        log = open(self.temp / f"node-{len(self.processes)}.log", "w")  # noqa: SIM115 - the node keeps it
        self.processes.append(subprocess.Popen([str(RAY), "start", *args], stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, **ENV}, start_new_session=True))

    def _alive(self) -> int:
        out = subprocess.run([str(RAY), "status", f"--address={self.address}"], capture_output=True, text=True,
                             env={**os.environ, **ENV}).stdout
        active = out.split("Active:")[1].split("Pending:")[0] if "Active:" in out else ""
        return sum(line.strip().startswith("1 node_") for line in active.splitlines())

    @staticmethod
    def _wait(ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                raise TimeoutError(f"the local Ray cluster: {what} not up in {timeout:.0f} s")
            time.sleep(0.5)

    def restart(self, node: int) -> None:
        """Node `node` again, after `kill` (a new node to Ray, as a machine rebooted)."""
        self.kill(node)
        self.processes[node].wait()
        started = self.processes[:]
        self._start([f"--address={self.address}", *self.common])
        started[node] = self.processes[-1]
        self.processes = started
        self._wait(lambda: self._alive() == len(self.processes), f"node {node} again")

    def kill(self, node: int) -> None:
        """Lose node `node`: SIGKILL to its raylet, object store and workers, at once. The workers the raylet starts
        are not in its process group: killed by the group alone, a worker went on to finish its trial."""
        import psutil

        try:
            workers = psutil.Process(self.processes[node].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        try:
            os.killpg(self.processes[node].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for process in workers:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue

    def stop(self) -> None:
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.time() + 5
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)
