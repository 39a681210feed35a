"""Embed an index's shards on a Ray cluster with Ray Data (``cvgl index --ray``).

Pipeline, one row per shard::

    shard descriptors ──map_batches(read_shard)──► pixels ──map_batches(actor pool)──► vectors ──► driver writes shard
                         stateless read tasks                N model-holding actors          (write_shard, atomic)

* Read tasks and actors run :func:`cvgl.index.shards.read_shard` and
  :func:`~cvgl.index.shards.embed_shard`, the functions of the in-process loop, one shard per
  call, so a shard's batches are the same on both paths and the index is the same.
* Each actor builds its encoder once from an :class:`~cvgl.models.factory.EncoderRecipe` (preset,
  weights, input size and, for random weights, the driver's RNG state) and refuses to embed if its identity differs
  from the driver's, so actors can never silently hold different models.
* Shards are written by the driver: the output folder only has to exist where ``cvgl`` runs. The
  source must be readable at the same path on every node (a shared or replicated file system).
* The known Ray Data deadlock on small machines — the actor pool reserves every CPU slot and the
  read tasks never get scheduled (ray-project/ray#44687) — is avoided by giving actors
  fractional CPUs and keeping :data:`READER_CPU_RESERVE` CPUs free for the readers.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from cvgl.errors import CvglError
from cvgl.index.shards import ShardPlan, embed_shard, read_shard, write_shard

if TYPE_CHECKING:  # torch and the model code load only where a model is built (not in read tasks)
    from cvgl.models.factory import EncoderRecipe
    from cvgl.models.identity import EncoderIdentity

#: CPUs of the cluster left to the read tasks; actors share the rest (at most one each).
READER_CPU_RESERVE = 0.5
#: Logical CPUs one read task asks for (so two can run in the reserve).
READER_CPUS = 0.25
#: Seconds to wait for a TCP answer from a cluster address before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0


class DistributedError(CvglError):
    """Ray is not installed, a cluster is unreachable or too small, or a worker failed."""


@dataclass(frozen=True)
class RayOptions:
    """``--ray auto|ADDRESS --workers N``: where to run and how many model-holding actors."""

    recipe: EncoderRecipe
    address: str = "auto"  # "auto": a private local Ray instance; else a running cluster's address
    workers: int = 2


def import_ray():
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # Ray Data is the part we need
    except ImportError:
        raise DistributedError("ray: not installed; pip install 'cvgl[ray]' (Ray Data) to use --ray") from None
    return ray


def local_cpus() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_reachable(address: str) -> None:
    """Fail in seconds with a clear message instead of Ray's long connection retries."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise DistributedError(f"ray: address '{address}' is not HOST:PORT or ray://HOST:PORT (or use --ray auto)")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise DistributedError(
            f"ray: cluster at {address} is unreachable ({exc.strerror or exc}); start it with "
            "`ray start --head` there, or use --ray auto for a local one"
        ) from None


@contextmanager
def ray_session(address: str = "auto", workers: int = 2) -> Iterator[float]:
    """Connect to (or start) Ray for the duration of the block; yields the start-up seconds.

    ``auto`` starts a private local instance with this machine's CPUs (never joins someone
    else's); any other value is a running cluster's address. A Ray already initialised by the
    caller is used as is and left running.
    """
    ray = import_ray()
    if address != "auto":
        check_reachable(address)
    if ray.is_initialized():
        yield 0.0
        return
    started = time.perf_counter()
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == "auto":
            ray.init(address="local", num_cpus=max(local_cpus(), 1), **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises many types; the user needs one line
        raise DistributedError(f"ray: could not start or join a cluster at '{address}' ({_one_line(exc)})") from None
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def actor_cpus(cluster_cpus: float, workers: int) -> float:
    """Logical CPUs per actor: at most one, and never all of them (readers need some)."""
    share = (float(cluster_cpus) - READER_CPU_RESERVE) / int(workers)
    if share < 0.1:
        raise DistributedError(
            f"ray: the cluster has {cluster_cpus:g} CPUs, too few for {workers} workers plus read tasks; "
            "use fewer --workers or a bigger cluster"
        )
    return min(1.0, round(share, 3))


def _read_batch(batch: dict, source) -> dict:
    """Read task: one shard's planned rows → its pixels and tile table."""
    shards, payloads = [], []
    for shard, rows in zip(batch["shard"], batch["rows"]):
        images, table = read_shard(source, pickle.loads(rows))
        shards.append(int(shard))
        payloads.append(pickle.dumps((images, table), protocol=pickle.HIGHEST_PROTOCOL))
    return {"shard": np.asarray(shards), "payload": np.asarray(payloads, dtype=object)}


class _EmbedActor:
    """A model-holding actor: builds the encoder once, embeds whole shards."""

    def __init__(self, recipe: EncoderRecipe, identity: EncoderIdentity, batch_size: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.encoder = recipe.build()
        self.batch_size = batch_size
        # Raised at the first call, not here: Ray Data retries failing actor constructors.
        self.mismatch = None
        if self.encoder.identity != identity:
            self.mismatch = "a Ray worker built a different encoder than the driver (weights or settings differ)"

    def __call__(self, batch: dict) -> dict:
        if self.mismatch:
            raise DistributedError(self.mismatch)
        payloads = []
        for payload in batch["payload"]:
            images, table = pickle.loads(payload)
            vectors = embed_shard(self.encoder, images, self.batch_size)
            payloads.append(pickle.dumps((vectors, table), protocol=pickle.HIGHEST_PROTOCOL))
        return {"shard": np.asarray(batch["shard"]), "payload": np.asarray(payloads, dtype=object)}


def embed_with_ray(
    plan: ShardPlan,
    folder,
    todo: Iterable[int],
    options: RayOptions,
    batch_size: int = 16,
    on_shard: Callable[[int, int], None] | None = None,
) -> None:
    """Embed the shards ``todo`` on Ray; each finished shard is written by the driver at once
    (so a crash keeps every shard that came back)."""
    todo = list(todo)
    if not todo:
        return
    ray = import_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # a worker's CvglError reaches us as itself
    cpus = ray.cluster_resources().get("CPU", 0.0)
    per_actor = actor_cpus(cpus, options.workers)
    items = [{"shard": shard, "rows": pickle.dumps(plan.rows(shard))} for shard in todo]
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(_read_batch, fn_kwargs={"source": plan.source}, batch_size=1, num_cpus=READER_CPUS)
        .map_batches(
            _EmbedActor,
            fn_constructor_kwargs={"recipe": options.recipe, "identity": plan.encoder_identity, "batch_size": batch_size},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=per_actor,
        )
    )
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.CRITICAL)  # Ray Data logs worker tracebacks; we report one line
    try:
        for row in dataset.iter_rows():
            vectors, table = pickle.loads(row["payload"])
            write_shard(folder, int(row["shard"]), table, vectors, plan.digest)
            if on_shard is not None:
                on_shard(int(row["shard"]), len(table))
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; surface their one line
        cause = _cvgl_cause(exc)
        if cause is not None:
            # Ray appends retry advice to the message; our messages are one line by convention.
            raise type(cause)(str(cause).splitlines()[0]) from None
        raise DistributedError(f"ray: embedding failed ({_one_line(exc)}); Ray's logs are under /tmp/ray") from None
    finally:
        data_logger.setLevel(level)


def _cvgl_cause(exc: BaseException) -> CvglError | None:
    """The CvglError raised by cvgl code (here or in a worker) that this exception is or wraps.

    Ray re-raises a worker's exception as a class deriving from both ``RayTaskError`` and the
    original class, with the original in ``.cause``: that original is what we want.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CvglError) and type(current).__module__.startswith("cvgl."):
            return current
        stack.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[:300]
