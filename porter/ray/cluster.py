"""Reaching a Ray cluster and sizing the actor pool on it.

Nothing here imports Ray at module level: ``porter[ray]`` is optional and the CLI never pays for it unless
``--ray`` is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import RuntimeSetupError, UsageError, first_line

EXTRA = "pip install 'porter[ray]'"
# The actors leave this many of the cluster's CPUs to Ray Data's read tasks, which take one whole CPU each by
# default (read_binary_files, read_images): actors holding every CPU stall the job before its first read (measured
# here: a local 2-CPU Ray with two 1-CPU actors, or two 0.9-CPU actors under a read_binary_files Dataset, never
# started its reads). Ray's CPUs are a scheduling budget: each actor still runs its own ORT thread(s).
READ_RESERVE = 1.0
READ_CPUS = 0.1  # what porter's own read tasks (files_dataset) ask for
CONNECT_TIMEOUT_S = 30  # Ray's own GCS connection timeout (it retries for minutes by default)
PROBE_TIMEOUT_S = 5  # a HOST:PORT that doesn't answer a TCP connect in this long is refused before ray.init


def require_ray():
    """``ray`` with Ray Data, or a RuntimeSetupError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part porter uses (ray[data])
    except ImportError as e:
        raise RuntimeSetupError(f"Ray is not installed ({first_line(e)}); install porter's Ray extra: {EXTRA}") \
            from None
    return ray


def check_address(address: str | None) -> str | None:
    """``None``/``local``: a local Ray on this machine; ``auto``: the running cluster; ``HOST:PORT`` or
    ``ray://HOST:PORT``: that cluster. Anything else is refused (``--ray`` takes an optional value, so an input
    folder written right after it would be read as an address)."""
    if address in (None, "", "local"):
        return None
    if address == "auto" or re.fullmatch(r"(ray|rays)://[\w.\-\[\]:]+", address) or \
            re.fullmatch(r"[\w.\-]+:\d{1,5}", address):
        return address
    raise UsageError(f"--ray {address!r} is not a Ray cluster address; give auto, HOST:PORT or ray://HOST:PORT, or "
                     f"--ray alone for a local Ray (write --ray=ADDRESS, or put --ray after the inputs)")


class Connection:
    """Ray for a block, connected on first ``connect()`` (a run whose features are all cached never starts Ray):
    the caller's own session if one is up (left running), else a new one (local, or ``address``) shut down when
    the block ends. Ray's own logging is kept to errors: porter reports what matters."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address, self.num_cpus = check_address(address), num_cpus
        self.started = False

    def connect(self):
        ray = require_ray()
        if ray.is_initialized():
            return ray
        if self.address not in (None, "auto"):
            probe(self.address)
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", str(CONNECT_TIMEOUT_S))
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(CONNECT_TIMEOUT_S))
        try:
            # "local": a new Ray of its own, not one another process started on this machine
            ray.init(address=self.address or "local", num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                     configure_logging=True)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError... all mean "not reachable"
            if self.address == "auto":
                raise RuntimeSetupError("--ray auto: no running Ray cluster found on this machine; start one (ray "
                                        "start --head), or give its address, or --ray alone for a local Ray") \
                    from None
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise RuntimeSetupError(f"can't start {where}: {first_line(e)}; check the address (ray status on the "
                                    f"head node prints it), or give --ray without an address for a local Ray") \
                from None
        self.started = True
        quiet_ray_data()
        return ray

    def close(self) -> None:
        if self.started:
            self.started = False
            require_ray().shutdown()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def probe(address: str) -> None:
    """A RuntimeSetupError at once when nothing listens at ``address``: Ray's own ``init`` on an unreachable
    address retries for minutes, printing warnings (measured here: over 2 minutes for 127.0.0.1:1)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise RuntimeSetupError(f"can't reach the Ray cluster at {address}: {first_line(e)}; check the address "
                                f"(ray status on the head node prints it), or give --ray without an address for a "
                                f"local Ray") from None


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray connected for the block (``Connection``, connected at once): yields the ``ray`` module."""
    with Connection(address, num_cpus) as connection:
        yield connection.connect()


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-execution INFO lines on porter's stderr."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    import warnings

    # a Dataset with fewer blocks than actors: the pool is sized for the cluster, not for this Dataset
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each holds: Ray resources and the ORT threads it runs."""

    actors: int
    cpus: float  # Ray CPUs each actor reserves
    gpus: float
    threads: int  # onnxruntime intra-op threads per actor (CPU)
    device: str  # what each actor's Predictor runs on

    def describe(self) -> str:
        if self.gpus:
            return f"{self.actors} Ray actor{'s' if self.actors != 1 else ''}, one GPU each"
        return (f"{self.actors} Ray actor{'s' if self.actors != 1 else ''} x {self.threads} CPU "
                f"thread{'s' if self.threads != 1 else ''}")


def plan_actors(resources: dict[str, float], device: str = "auto", actors: int | None = None,
                threads: int | None = None) -> ActorPlan:
    """The actor pool for a cluster with ``resources`` (``ray.cluster_resources()``).

    GPUs (``device`` auto/cuda/tensorrt and the cluster has them): one actor per GPU, ``num_gpus=1`` each. CPUs:
    ``threads`` per actor (default 1: independent single-threaded actors beat multi-threaded ones on small batches,
    as porter's own CPU streams do), as many actors as the cluster's CPUs hold, together reserving all but one
    CPU so Ray Data's reads always find room."""
    if actors is not None and (not isinstance(actors, int) or actors < 1):
        raise UsageError(f"--actors must be a positive integer, got {actors!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads per actor must be a positive integer, got {threads!r}")
    cpus = float(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0))
    if device in ("auto", "cuda", "tensorrt") and gpus:
        return ActorPlan(actors or gpus, 1.0, 1.0, threads or 1, "cuda" if device == "auto" else device)
    if device in ("cuda", "tensorrt"):
        raise RuntimeSetupError(f"--device {device}: the Ray cluster has no GPU; give --device cpu (or auto)")
    if cpus < 1:
        raise RuntimeSetupError("the Ray cluster offers no CPU to run the model on")
    threads = threads or 1
    fit = max(1, int(cpus // threads))
    n = actors or fit
    per_actor = max(0.0, min(float(threads), (cpus - READ_RESERVE) / n))
    return ActorPlan(n, round(per_actor, 3), 0.0, threads, "cpu" if device == "auto" else device)
