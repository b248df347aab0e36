"""The frozen-feature pass on a Ray cluster: images decoded and their views computed by actors, each holding one
ONNX Runtime session, while this process keeps the feature store.

Results come back to the process that runs the pass and go into its store through the store's own `fill`: it
claims a shard's items, the actors compute them, the shard is written whole, then the claim is released. The
store's rules hold unchanged (an item in one shard only, claims taken over when their owner dies), and no
machine but this one needs the store or the images: an actor gets each image's bytes with its task. A shared
store written by every node would need a file system whose locks and renames hold across machines, which
network file systems do not promise. An actor lost with its node loses only its batches in flight; they go to
the actors left.

Without `--ray` (`connected(None)`) nothing here runs and Ray is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune import quiet
from mobiletune.config import Config, from_flat
from mobiletune.errors import MobiletuneError, UsageError
from mobiletune.features.views import ShardRows, store_dtype

ENV_QUIET = {"RAY_USAGE_STATS_ENABLED": "0"}  # no usage report, no line about it
IN_FLIGHT = 2  # batches queued per actor: the next one is on its way while one is computed
# seconds to wait for HOST:PORT to accept a connection before Ray is asked to join it: Ray itself retries a dead
# address for about a minute and then raises; a head on the same network answers in milliseconds
PROBE_S = 5.0


@dataclass(frozen=True)
class RayCluster:
    """Where the feature pass runs, and how it is split up."""

    address: str  # "auto" (RAY_ADDRESS, or the cluster this machine is part of), "HOST:PORT" or "ray://HOST:PORT"
    # actors computing features; 0: as many as the cluster's CPUs hold at `cpus_per_actor` each
    actors: int = 0
    # CPUs (ONNX Runtime threads) per actor: an actor decodes its images on one thread, so one actor per CPU
    # keeps every core busy; on a 2-CPU node two 1-CPU actors took 14.9 s where one 2-CPU actor took 18.9
    # (benchmarks/ray_features.py, docs/scaling.md)
    cpus_per_actor: int = 1
    # images per task: 16 and 64 measured alike (18.2 and 18.0 s on 2 one-CPU nodes), 4 slower (20.5 s: a round
    # trip per 4 images); the smaller of the fast two, so a lost node loses less work
    batch: int = 16

    def __post_init__(self) -> None:
        for name in ("actors", "cpus_per_actor", "batch"):
            value, least = getattr(self, name), 0 if name == "actors" else 1
            if not isinstance(value, int) or value < least:
                raise UsageError(f"RayCluster({name}={value!r}): give a whole number of at least {least}")


_active: RayCluster | None = None


def active() -> RayCluster | None:
    """The cluster the feature pass runs on, while `connected` holds it; None: this process."""
    return _active


def import_ray() -> Any:
    """Ray, or a one-line error naming the extra that installs it."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--ray: Ray is not installed; pip install 'mobiletune[ray]'")
    os.environ.update({k: v for k, v in ENV_QUIET.items() if k not in os.environ})
    import ray

    return ray


@contextmanager
def connected(cluster: RayCluster | str | None) -> Iterator[RayCluster | None]:
    """Connect to `cluster` (an address, or RayCluster) for what runs inside; None: nothing changes.
    A connection this made is closed after; one the caller made (`ray.init` in a notebook) is kept."""
    global _active
    if cluster is None:
        yield None
        return
    cluster = cluster if isinstance(cluster, RayCluster) else RayCluster(cluster)
    ray = import_ray()
    ours = not ray.is_initialized()
    if ours:
        probe(cluster.address)
        try:  # muted: retrying an address that answers but is no Ray head, Ray's C++ client logs a line a second
            with quiet.native_output_muted():
                ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR",
                         configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
            raise UsageError(f"--ray {cluster.address}: cannot connect ({str(exc).splitlines()[0][:200]}); start "
                             "a cluster with `ray start --head`, or give its address") from None
        _quiet_node_deaths()
    _active = cluster
    try:
        yield cluster
    finally:
        _active = None
        if ours:
            ray.shutdown()


def probe(address: str) -> None:
    """A one-line error at once where `address` ("HOST:PORT" or "ray://HOST:PORT") accepts no connection; "auto"
    is Ray's to resolve."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--ray {address}: give HOST:PORT (the head's address, e.g. 10.0.0.5:6379; a port from 1 "
                         "to 65535), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UsageError(f"--ray {address}: nothing answers there ({reason}); start a cluster with "
                         "`ray start --head`, or give its address") from None


def _quiet_node_deaths() -> None:
    """Ray's driver prints the cluster's "node ... has been marked dead" (with Ray's advice) to stdout from a
    thread of its own, whatever `log_to_driver` says; the pass goes on without that node, and the sweep says what
    the loss cost in a line of its own. That message alone is dropped; Ray's other messages still show."""
    worker = sys.modules.get("ray._private.worker")
    original = getattr(worker, "print_to_stdstream", None)  # private: without it, Ray's line simply shows
    if original is None or getattr(original, "quiet_node_deaths", False):
        return

    def filtered(data: dict, *args, **kwargs) -> None:
        if data.get("pid") == "raylet" and any("has been marked dead" in line for line in data.get("lines", [])):
            return
        original(data, *args, **kwargs)

    filtered.quiet_node_deaths = True
    worker.print_to_stdstream = filtered


class _Extractor:
    """A Ray actor: one ONNX Runtime session of the extractor, loaded once, computing batches of images' views."""

    def __init__(self, model: bytes, config: dict[str, Any], threads: int):
        from mobiletune.features.onnx import OnnxRunner
        from mobiletune.features.views import ViewPass

        self.config = from_flat(config)
        self.views = ViewPass(OnnxRunner(model, threads), self.config)

    def compute(self, batch: list[tuple[str, bytes | str, list[int | None]]]
                ) -> tuple[list[tuple[list[int], int | None, list[np.ndarray]]], dict[int, str]]:
        """`batch`: each image's sha256, its file's bytes (or why they could not be read) and the views it needs.
        Returns (rows of the batch, view, outputs) per view, and {row: reason} of the images that failed."""
        from mobiletune.data.pixels import BadImage, decode_checked

        size = self.config.data.image_size
        pixels, kept, failed = [], [], {}
        for j, (digest, data, _) in enumerate(batch):
            try:
                if isinstance(data, str):
                    raise BadImage(data)
                pixels.append(decode_checked(data, size, digest))
                kept.append(j)
            except BadImage as exc:
                failed[j] = str(exc)
        if not kept:
            return [], failed
        results = self.views(np.stack(pixels), [batch[j][0] for j in kept], [batch[j][2] for j in kept])
        # in the store's types here: the float16 boundaries are half the bytes to ship, the same numbers stored
        return [([kept[r] for r in rows], view, [o.astype(store_dtype(k), copy=False) for k, o in enumerate(outs)])
                for rows, view, outs in results], failed


def _read(path: Path) -> bytes | str:
    try:
        return path.read_bytes()
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"


class ClusterComputer:
    """Computes a chunk of store items on the cluster's actors (the `compute` of `FeatureStore.fill`), writing
    the rows into the shard this process writes. The actors start on the first chunk and stop with `close`."""

    def __init__(self, cluster: RayCluster, extract, config: Config, images, item_of: dict, failed: dict[int, str],
                 model: bytes):
        self.cluster, self.extract, self.config, self.images = cluster, extract, config, images
        self.item_of, self.failed, self.model = item_of, failed, model
        self.actors: list[Any] = []

    def _start(self) -> None:
        ray = import_ray()
        count = self.cluster.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cluster.cpus_per_actor)
        actor = ray.remote(num_cpus=self.cluster.cpus_per_actor, max_restarts=0)(_Extractor)
        model = ray.put(self.model)
        self.actors = [actor.options(scheduling_strategy="SPREAD").remote(model, self.config.flat(),
                                                                          self.cluster.cpus_per_actor)
                       for _ in range(count)]

    def close(self) -> None:
        """Stop the actors: their CPUs are the cluster's again (a sweep's trials need them next)."""
        if self.actors:
            ray = import_ray()
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []

    def __call__(self, chunk: list[bytes], folder: Path, heartbeat) -> set[bytes]:
        if not self.actors:
            self._start()
        shard = ShardRows(folder, self.extract, chunk, self.item_of, self.failed)
        positions = list(shard.wanted)
        size = self.cluster.batch
        batches = deque(positions[s : s + size] for s in range(0, len(positions), size))
        for batch, (results, broken) in self._map(batches, shard.wanted):
            for j, reason in broken.items():
                shard.fail(batch[j], reason)
            shard.write(batch, results)
            heartbeat()
        return shard.close()

    def _map(self, batches: deque, wanted: dict) -> Iterator[tuple[list[int], Any]]:
        """(batch, its result) as actors finish them; a batch whose actor died goes to another actor."""
        ray = import_ray()
        pending: dict[Any, tuple[list[int], Any]] = {}

        def submit(actor) -> None:
            batch = batches.popleft()
            task = [(self.images.hashes[i], _read(self.images.root / self.images.paths[i]), [v for v, _ in wanted[i]])
                    for i in batch]
            pending[actor.compute.remote(task)] = (batch, actor)

        for _ in range(IN_FLIGHT):
            for actor in self.actors:
                if batches:
                    submit(actor)
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            batch, actor = pending.pop(ready)
            try:
                result = ray.get(ready)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                self._lose(actor, pending, batches, batch)
                if not self.actors:
                    raise MobiletuneError("--ray: every feature actor was lost (their nodes died or ran out of "
                                          "memory); run again to go on from what is stored") from None
                for alive in self.actors:  # the lost batches go to the actors left
                    while batches and sum(a is alive for _, a in pending.values()) < IN_FLIGHT:
                        submit(alive)
                continue
            if batches:
                submit(actor)
            yield batch, result

    def _lose(self, actor, pending: dict, batches: deque, batch: list[int]) -> None:
        """Forget a dead actor; its batches (the one that failed and those queued on it) are done again."""
        if actor in self.actors:
            self.actors.remove(actor)
        batches.appendleft(batch)
        for ref, (queued, owner) in list(pending.items()):
            if owner is actor:
                del pending[ref]
                batches.appendleft(queued)
