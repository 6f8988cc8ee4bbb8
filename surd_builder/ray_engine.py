"""Batch work on a Ray cluster with Ray Data: the one module that imports ``ray``.

surd's stages are pure functions over Arrow batches (``pipelines/base.py``), so running them on
a cluster needs no scheduler of surd's own: the batches become Ray Data blocks, and
``map_batches`` hands them to a pool of actors (one model load per actor, not per batch) that
ask Ray for the CPUs or GPU they need. What a worker sends back is small (counts, not rows):
workers write their results into the workspace themselves, atomically, as the local engine's
worker processes do, so the workspace must be on a filesystem every node mounts at the same
path. Workers run in the driver's working directory when their node has it (relative paths
then mean what they mean here).

Ray is an optional extra (``pip install 'surd[ray]'``); importing this module does not import
it. Errors a user can act on (:class:`~surd_builder.errors.SurdError`, ``OSError``) raised in a
worker come back as themselves and end the run with their one-line message, instead of a page
of Ray's wrapped traceback: they travel as data (Ray Data keeps only the text of a worker's
exception).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from surd_builder.errors import InputError, ServiceError, SurdError

INSTALL_HINT = "pip install 'surd[ray]'"
ENGINES = ("local", "ray")
# The packages a worker needs, shipped to a cluster the driver joins, so every worker runs the
# driver's code (the nodes need surd's dependencies installed, not surd itself).
CODE_PACKAGES = ("surd_builder", "pipelines", "annotation", "adapter")
# CPUs (torch threads: Ray sets OMP_NUM_THREADS to them) of a worker running a model without a
# GPU: one model copy per few cores, not one per core.
MODEL_CPUS = 4.0
# CPUs of each task that prepares batches for GPU workers (reads their images).
PREPARE_CPUS = 0.5
PROBE_SECONDS = 5.0
RESULT = "surd_result"
ERROR = "surd_error"
_joined: dict[str, str] = {}  # "address": what this process joined ("local": a Ray it started)


@dataclass(frozen=True)
class RayOptions:
    #: a cluster to join (``ray://host:10001``, ``host:6379``, ``auto``); ``None``: the one in
    #: ``RAY_ADDRESS``, or else a new Ray on this machine for this process
    address: str | None = None
    #: actors to run; ``None``: as many as the cluster's CPUs (or GPUs) fit
    workers: int | None = None


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of: {', '.join(ENGINES)}")


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--engine ray needs Ray: {INSTALL_HINT}") from None
    return ray


def check_device(device: str | None) -> None:
    if device is not None and device.startswith("cuda:"):
        raise InputError(
            f"--device {device}: on Ray use --device cuda (Ray gives each worker its own GPU)"
        )


def _probe(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at ``address`` (Ray itself retries
    an unreachable cluster for minutes)."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise InputError(f"--ray-address {address}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as error:
        raise ServiceError(
            f"cannot reach the Ray cluster at {address}: {error.strerror or error}"
        ) from None


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a new local Ray;
    once per process (later calls, and a Ray the caller started, are reused)."""
    ray = require_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        joined = _joined.get("address")
        if address is not None and joined is not None and address != joined:
            raise InputError(
                f"this process already joined the Ray cluster at {joined}; run the commands "
                f"for {address} in another process"
            )
        _quiet_ray_data()
        return
    # Ray's C++ core logs an error line for every actor pool it starts (its issue 53727), which
    # reads like a failure; surd's errors reach the user as Python exceptions anyway.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    runtime_env = None
    if address is not None:
        _probe(address)
        import importlib

        runtime_env = {"py_modules": [importlib.import_module(p) for p in CODE_PACKAGES]}
    try:
        ray.init(
            # "local": a new Ray here, never one another program happens to run on this machine
            address=address or "local",
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,  # workers' logs stay in Ray's session folder
            runtime_env=runtime_env,
        )
    except ConnectionError as error:
        raise ServiceError(f"cannot join the Ray cluster at {address}: {error}") from None
    _joined["address"] = address or "local"
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    """surd draws its own progress bar and prints its own summary."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def check_visible(path: Path, what: str, error: type[SurdError], hint: str) -> None:
    """Raise ``error`` when ``path`` (shared storage the driver named) does not exist on the
    node this worker runs on."""
    if not path.exists():
        raise error(f"{what} {path} is not visible on Ray node {socket.gethostname()}: {hint}")


def cluster_resources() -> dict[str, float]:
    return dict(require_ray().cluster_resources())


def smallest_node_cpus() -> float:
    """CPUs of the smallest alive node: a worker asking for more could never be placed."""
    nodes = [node for node in require_ray().nodes() if node.get("Alive")]
    cpus = [node.get("Resources", {}).get("CPU", 0.0) for node in nodes]
    return min((c for c in cpus if c > 0), default=1.0)


@dataclass(frozen=True)
class Placement:
    """How a run's workers sit on the cluster."""

    num_cpus: float  # per worker
    num_gpus: float  # per worker, 0 or 1
    workers: int
    prepare_apart: bool  # the preparing step runs as CPU tasks of its own (else in the worker)
    fit: int = 1  # workers the cluster's resources hold now


def place(
    cpus: float,
    device: str | None,
    batches: int,
    workers: int | None = None,
    default_workers: int | None = None,
    prepare: bool = False,
) -> Placement:
    """Resources per worker and the pool size for ``batches`` batches.

    A GPU per worker for models on ``cuda``, and on ``auto`` when the cluster has GPUs; a model
    on CPUs gets up to :data:`MODEL_CPUS` cores. Workers that read images on a GPU get them from
    CPU tasks, if the cluster has CPUs to spare for those beside the workers (else the workers
    read them, rather than wait forever for CPUs they hold themselves). Pool: ``workers`` if
    given, else ``default_workers``, else as many as fit; never more than there are batches."""
    check_device(device)
    resources = cluster_resources()
    total_cpus, total_gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    if device == "cuda" and total_gpus == 0:
        raise InputError("--device cuda: the Ray cluster has no GPU (use --device auto or cpu)")
    num_gpus = 1.0 if device == "cuda" or (device == "auto" and total_gpus > 0) else 0.0
    if device is not None and not num_gpus:
        cpus = max(cpus, min(MODEL_CPUS, smallest_node_cpus()))
    by_cpu = int(total_cpus // cpus)
    prepare_apart = prepare and num_gpus > 0 and (total_cpus - cpus) >= PREPARE_CPUS
    if prepare_apart:
        by_cpu = int((total_cpus - PREPARE_CPUS) // cpus)
    fit = min(by_cpu, int(total_gpus // num_gpus)) if num_gpus else by_cpu
    size = workers or default_workers or fit
    if prepare_apart:
        size = min(size, max(1, by_cpu))  # the tasks feeding the workers keep a CPU
    return Placement(cpus, num_gpus, max(1, min(size, batches)), prepare_apart, max(1, fit))


# ----------------------------------------------------------------- running batches


def _error_table(error: BaseException) -> pa.Table:
    return pa.table({ERROR: pa.array([pickle.dumps(error)], pa.binary())})


class _BatchActor:
    """One Ray Data actor: on its first batch it takes the driver's working directory (when
    this node has it) and environment variables the work reads (API keys), then builds its
    worker (models load once per actor); it runs the worker on every batch it is given and
    returns the pickled result, or the user error that stopped it."""

    def __init__(
        self,
        make_worker: Callable[[], Callable[[pa.Table], Any]],
        prepare: Callable[[pa.Table], pa.Table] | None,
        cwd: str,
        environment: Mapping[str, str],
    ):
        self._make_worker, self._prepare = make_worker, prepare
        self._cwd, self._environment = cwd, dict(environment)
        self._worker: Callable[[pa.Table], Any] | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if ERROR in batch.column_names:  # the preparing step failed: pass its error on
            errors = [error for error in batch[ERROR].to_pylist() if error is not None]
            if errors:
                return pa.table({ERROR: pa.array(errors[:1], pa.binary())})
            batch = batch.drop_columns([ERROR])
        try:
            if self._worker is None:
                if Path(self._cwd).is_dir():
                    os.chdir(self._cwd)
                for name, value in self._environment.items():
                    os.environ.setdefault(name, value)  # the node's own setting wins
                self._worker = self._make_worker()
            if self._prepare is not None:
                batch = self._prepare(batch)
            result = self._worker(batch)
        except (SurdError, OSError) as error:
            return _error_table(error)
        return pa.table({RESULT: pa.array([pickle.dumps(result)], pa.binary())})


def _prepare_task(batch: pa.Table, prepare: Callable[[pa.Table], pa.Table], cwd: str) -> pa.Table:
    """The preparing step as a task. Its error travels in the batch (every row kept, so the
    block keeps its size) to the worker, which passes it on."""
    if Path(cwd).is_dir():
        os.chdir(cwd)
    try:
        return prepare(batch)
    except (SurdError, OSError) as error:
        marks = [pickle.dumps(error)] + [None] * (batch.num_rows - 1)
        return batch.append_column(ERROR, pa.array(marks, pa.binary()))


def map_batches(
    batches: Sequence[pa.Table],
    make_worker: Callable[[], Callable[[pa.Table], Any]],
    *,
    cpus: float = 1.0,
    device: str | None = None,
    workers: int | None = None,
    default_workers: int | None = None,
    prepare: Callable[[pa.Table], pa.Table] | None = None,
    environment: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Run ``make_worker()(prepare(batch))`` on every batch in a pool of Ray actors placed by
    :func:`place`; yield each batch's result as it finishes, in any order.

    ``prepare`` (reading images, say) runs as CPU tasks of its own for workers with a GPU, so
    those spend their time on the model; otherwise in the worker. ``make_worker`` and
    ``prepare`` must pickle (they travel to the cluster); ``environment`` is given to the
    workers' processes (values the work reads from the environment, e.g. an API key: they
    travel in memory with the job). A :class:`SurdError` or ``OSError`` raised in either is
    raised here, as itself."""
    if not batches:
        return
    connect()
    import ray.data

    placement = place(cpus, device, len(batches), workers, default_workers, prepare is not None)
    cwd = os.getcwd()
    dataset = ray.data.from_arrow(list(batches))
    # The batches are the blocks, all full but the last; Ray Data wants a batch size for
    # workers with GPUs, and this one cuts the blocks where the runner did (a task given the
    # short last block and another may cut across them: the same rows, other parts).
    batch_size = max(batch.num_rows for batch in batches)
    if placement.prepare_apart:
        dataset = dataset.map_batches(
            _prepare_task,
            fn_args=(prepare, cwd),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=PREPARE_CPUS,
        )
    inside = None if placement.prepare_apart else prepare
    size = placement.workers
    # A number the user gave is started before any batch (a pool that may then grow to it on a
    # cluster that scales up); otherwise the pool starts with what fits and grows as needed.
    ready = min(size, placement.fit) if workers else 1
    dataset = dataset.map_batches(
        _BatchActor,
        fn_constructor_args=(make_worker, inside, cwd, dict(environment or {})),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=ready, max_size=size, initial_size=size),
        num_cpus=placement.num_cpus,
        num_gpus=placement.num_gpus,
    )
    for row in dataset.iter_rows():
        if row.get(ERROR) is not None:
            raise pickle.loads(row[ERROR])
        yield pickle.loads(row[RESULT])


# ----------------------------------------------------------------- a limiter for all workers


class _SharedReserver:
    """A Ray actor holding one limiter that every worker of a run books its slots from."""

    def __init__(self, make_limiter: Callable[[], Any]):
        self._limiter = make_limiter()

    def reserve(self, host: str) -> float:
        return self._limiter.reserve(host)


class SharedHostLimiter:
    """Per-host request slots booked from one place for all of a run's workers, so a rate of
    R requests/s per host holds for the run, whatever the number of workers and nodes. The
    limiter's own clock decides and each worker is told how long to wait, so workers' clocks
    need not agree (a reply's travel time shifts single requests by milliseconds; the rate
    over the run is the limiter's). Picklable: it travels to the workers inside the stage."""

    def __init__(self, make_limiter: Callable[[], Any]):
        ray = require_ray()
        connect()
        actor = ray.remote(num_cpus=0, max_restarts=3)(_SharedReserver)
        self._actor = actor.remote(make_limiter)

    def reserve(self, host: str) -> float:
        """Book ``host``'s next slot; the seconds until it starts."""
        import ray

        return ray.get(self._actor.reserve.remote(host))

    def wait(self, host: str) -> None:
        delay = self.reserve(host)
        if delay > 0:
            time.sleep(delay)

    def close(self) -> None:
        import ray

        ray.kill(self._actor)
