"""Run an analysis' units on Ray: a pool of actors that each load the model once.

:class:`RayExecutor` is an executor for :func:`analyses.runner.run`. The driver (the process that
runs ``headwise scan``) plans, stamps, writes and reduces exactly as in a serial run; only
:func:`analyses.runner.compute` runs elsewhere. Each actor loads the model by the same name and
options the driver used (:class:`ModelRecipe`) and is checked against the driver's weights hash
before it gets a unit. Units go to idle actors; payloads come back to the driver, which writes each
through the unit store as it arrives, so

* a scan resumes from whatever mix of serial and distributed runs wrote its units (same stamps);
* a worker that dies loses only the unit it held: a fresh actor replaces it and the unit is retried
  (``retries`` times), else it is left for the rerun and the scan ends with :class:`WorkersLostError`
  after every other unit is written;
* the result is the serial one: the same units, reduced in plan order by the driver.

Local clusters (``workers=N``, no address) listen on 127.0.0.1 only, start no dashboard and send no
usage statistics; ``address="host:port"`` (or ``"auto"``) joins a running cluster instead, whose
workers must reach the same model (a named model, a folder on a shared filesystem, or a cached
hub id). Ray is the optional extra ``headwise[distributed]``.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from probe.errors import HeadwiseError, InputError, ModelLoadError, ModelMismatchError

from .contract import Unit
from .runner import ComputeTask, compute

EXTRA = "pip install 'headwise[distributed]' (or: pip install ray)"
LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0",               # no usage statistics leave the machine
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}      # a local node's IP is 127.0.0.1: every server binds there
OBJECT_STORE_BYTES = 256 * 2**20                            # payloads are small; do not claim 30% of the RAM


class ClusterError(HeadwiseError, RuntimeError):
    """The Ray cluster could not be started or joined."""


class WorkersLostError(HeadwiseError, RuntimeError):
    """Workers died holding units that were not retried; every other unit is written, a rerun computes the rest."""


def require_ray():
    """The ``ray`` module, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--workers / --ray-address run the scan on Ray, which is not installed: {EXTRA}") from None
    return ray


def start_local(cpus: int, attempts: int = 3) -> None:
    """Start a new Ray cluster on this machine only (never joins one already running): 127.0.0.1, no dashboard,
    no usage statistics.

    Its workers run at the driver's priority: Ray's default niceness (15) let every other process on a
    shared machine take their CPU (a 2-worker scan beside three one-thread jobs got 16% of a core each).
    Ray gives its node 30 s to register; on a machine busy with other work that can pass, so the start is
    tried ``attempts`` times before it fails with the reason.
    """
    ray = require_ray()
    _loopback(ray)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=int(cpus), include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                     namespace="headwise", log_to_driver=True, configure_logging=False,
                     _system_config={"worker_niceness": 0})   # Ray's default, 15, starves the scan beside any job
            _check_loopback(ray)
            return
        except ClusterError:
            raise
        except Exception as exc:  # Ray raises a bare Exception when its node times out at start-up
            ray.shutdown()
            if attempt == attempts:
                raise ClusterError(f"Ray could not start a local cluster in {attempts} attempts ({exc}); is the "
                                   "machine overloaded? Retry, or use fewer --workers") from exc
            print(f"headwise: Ray start-up failed ({str(exc)[:80]}); retrying ({attempt}/{attempts})", file=sys.stderr)


def _loopback(ray) -> None:
    """Make the local node's address 127.0.0.1 (so every Ray server binds there) and switch off usage stats.

    Ray reads the switch when it is imported; if it was imported before, its constant is set here too.
    """
    os.environ.update(LOCAL_ENV)   # inherited by every process the cluster starts
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _check_loopback(ray) -> None:
    """Refuse (and stop) a local cluster whose node is reachable from outside this machine."""
    addresses = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise ClusterError(f"the local Ray node came up on {sorted(addresses)}, not 127.0.0.1 only; "
                           "refusing to run a cluster others could reach (start one yourself and pass --ray-address)")


@contextmanager
def local_cluster(cpus: int) -> Iterator[None]:
    """A local cluster (:func:`start_local`) for the block; executors inside share it and leave it running.
    Inside a running cluster (``ray.is_initialized()``) it uses that one and leaves it running."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    start_local(cpus)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ModelRecipe:
    """What a worker loads: ``load_model(name, **options)`` with ``threads`` torch threads."""

    name: str
    options: dict = field(default_factory=dict)
    threads: int = 1

    def load(self):
        import torch

        from probe import load_model

        torch.set_num_threads(max(1, int(self.threads)))
        return load_model(self.name, **self.options)


class _Worker:
    """The actor: one model, loaded once; computes units of any stage."""

    def __init__(self, recipe: ModelRecipe):
        self.model = recipe.load()

    def identity(self) -> tuple[str, int]:
        return self.model.weights_hash, os.getpid()

    def compute(self, task: ComputeTask, unit: Unit) -> dict:
        return compute(self.model, task, unit)


class RayExecutor:
    """Maps :func:`analyses.runner.compute` over units on a pool of Ray actors (see the module docstring).

    ``workers``: actors in the pool (each loads the model); ``address``: join this cluster (else a local
    one is started with ``workers`` CPUs); ``retries``: how often a unit whose worker died is retried;
    ``gpus_per_worker``: GPUs each actor reserves (Ray sets its ``CUDA_VISIBLE_DEVICES``).
    Use as a context manager (or call :meth:`close`) to stop the actors and a cluster it started.
    """

    def __init__(self, recipe: ModelRecipe, workers: int | None = 2, *, address: str | None = None, retries: int = 1,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0):
        if workers is None and address is None:
            raise InputError("give the number of workers (--workers N) or a cluster to join (--ray-address)")
        if workers is not None and int(workers) < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise InputError("a worker needs a positive number of CPUs and a non-negative number of GPUs")
        if retries < 0:
            raise InputError(f"retries must be >= 0, got {retries}")
        self.ray = require_ray()
        self.recipe, self.address, self.retries = recipe, address, int(retries)
        self.workers = None if workers is None else int(workers)
        self.gpus, self.cpus = float(gpus_per_worker), float(cpus_per_worker)
        self._actors: list = []
        self._pids: dict[int, int] = {}          # actor index -> worker process id
        self._in_flight: dict = {}               # ObjectRef -> (actor index, unit, attempt)
        self._started = False
        self._hash: str | None = None

    @property
    def label(self) -> str:
        """What the progress bar adds to its title: the units run across this many workers."""
        n = self.workers if self.workers is not None else "?"
        return f" on {n} Ray worker{'' if n == 1 else 's'}"

    # ------------------------------------------------------------------ cluster and pool
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        if self.address is None:
            start_local(max(int(self.workers * self.cpus + 0.999), 1))
            self._started = True
        else:
            try:
                ray.init(address=self.address, namespace="headwise", log_to_driver=True, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ClusterError(f"could not join the Ray cluster at {self.address!r}: {exc}. Start it with "
                                   "`ray start --head` (or check the address)") from exc
        if self.workers is None:   # joined a cluster without --workers: one worker per cpus_per_worker CPUs
            self.workers = max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.cpus))

    def _spawn(self, index: int):
        actor_cls = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)(_Worker)
        return actor_cls.remote(self.recipe)

    def _check(self, index: int, identity) -> None:
        found, pid = identity
        if found != self._hash:
            raise ModelMismatchError(
                f"worker {index} loaded {self.recipe.name!r} with weights {found}, the driver has {self._hash}: "
                "every worker must see the same model (a shared folder or the same hub revision)")
        self._pids[index] = pid

    def start(self, model) -> None:
        """Start the pool now (else the first :meth:`map` does): each worker loads the model and is checked."""
        self._pool(model)

    def _pool(self, model) -> None:
        if self._hash is not None and self._hash != model.weights_hash:
            raise ModelMismatchError(f"this executor's workers hold weights {self._hash}, not {model.weights_hash}: "
                                     "use one executor per model")
        self._hash = model.weights_hash
        if self._actors:
            return
        self._connect()
        print(f"headwise: starting {self.workers} Ray worker(s), each loading {self.recipe.name}", file=sys.stderr)
        self._actors = [self._spawn(i) for i in range(self.workers)]
        for i, identity in enumerate(self._identities(self._actors)):
            self._check(i, identity)

    def _identities(self, actors: list) -> list:
        try:
            return self.ray.get([a.identity.remote() for a in actors])
        except self.ray.exceptions.RayActorError as exc:   # __init__ failed: the worker could not load the model
            raise ModelLoadError(f"a Ray worker could not load {self.recipe.name!r} with {self.recipe.options}: "
                                 f"{exc}") from None

    def _replace(self, index: int) -> None:
        self._actors[index] = self._spawn(index)
        self._check(index, self._identities([self._actors[index]])[0])

    def worker_pids(self) -> dict[int, int]:
        """Actor index -> process id of each live worker."""
        return dict(self._pids)

    def in_flight(self) -> list[tuple[str, int]]:
        """``(unit id, worker pid)`` of each unit being computed now."""
        return [(unit.id, self._pids.get(i, -1)) for i, unit, _ in self._in_flight.values()]

    # ------------------------------------------------------------------ the executor protocol
    def map(self, model, task: ComputeTask, units: list[Unit]) -> Iterator[tuple[Unit, dict]]:
        """Yield ``(unit, payload)`` as workers finish (any order); the runner writes each at once."""
        if not units:
            return
        self._pool(model)
        ray = self.ray
        task_ref = ray.put(task)
        todo, idle, lost, failure = deque((u, 0) for u in units), list(range(len(self._actors))), [], None
        self._in_flight.clear()
        while todo or self._in_flight:
            while todo and idle:
                index, (unit, attempt) = idle.pop(0), todo.popleft()
                self._in_flight[self._actors[index].compute.remote(task_ref, unit)] = (index, unit, attempt)
            ready, _ = ray.wait(list(self._in_flight), num_returns=1)
            index, unit, attempt = self._in_flight.pop(ready[0])
            try:
                payload = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                self._lost(index, unit, attempt, exc, todo, lost)
                idle.append(index)
                continue
            except ray.exceptions.RayTaskError as exc:   # the unit's own error: raised as a serial run would, once
                failure = failure or exc.as_instanceof_cause()   # the units in flight are in (and written)
                todo.clear()
                idle.append(index)
                continue
            idle.append(index)
            yield unit, _writable(payload)
        if failure is not None:
            raise failure
        if lost:
            raise WorkersLostError(f"{len(lost)} unit(s) were lost with their worker ({', '.join(lost[:3])}"
                                   f"{' ...' if len(lost) > 3 else ''}); every other unit is saved: rerun the same "
                                   "command to compute the rest")

    def _lost(self, index: int, unit: Unit, attempt: int, exc, todo: deque, lost: list) -> None:
        """A worker died holding ``unit``: replace it; retry the unit or leave it for the rerun."""
        pid = self._pids.pop(index, None)
        retry = attempt < self.retries
        print(f"headwise: worker {index} (pid {pid}) died computing {unit.id} ({type(exc).__name__}); "
              f"{'retrying it on a fresh worker' if retry else 'leaving it for the rerun'}", file=sys.stderr)
        self._replace(index)
        if retry:
            todo.appendleft((unit, attempt + 1))
        else:
            lost.append(unit.id)

    def close(self) -> None:
        """Stop the actors (and the local cluster this executor started)."""
        for actor in self._actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already dead
                pass
        self._actors, self._pids = [], {}
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _writable(payload: dict) -> dict:
    """Arrays from Ray's object store are read-only views: copy them, so a reduce may use them as a serial run's."""
    import numpy as np

    return {k: v.copy() if isinstance(v, np.ndarray) and not v.flags.writeable else v for k, v in payload.items()}


def diff_units(a, b) -> list[str]:
    """``stage/unit`` ids whose payloads differ between two results folders (or exist in one only); [] = identical.

    Arrays must match exactly (dtype, shape, every element); JSON values must be equal. Stamps are not
    compared (a serial and a distributed run of the same command stamp their units alike anyway).
    """
    import numpy as np

    from .units import UnitStore

    sa, sb = UnitStore(a), UnitStore(b)
    ids = {(p.parent.name, p.name.rsplit(".", 1)[0]) for s in (sa, sb) for p in (s.root / "units").glob("*/*.*")
           if not p.name.startswith(".")}
    bad = []
    for stage, uid in sorted(ids):
        if sa.path(stage, uid) is None or sb.path(stage, uid) is None:
            bad.append(f"{stage}/{uid}")
            continue
        pa, pb = sa.get(stage, uid), sb.get(stage, uid)
        same = pa.keys() == pb.keys() and all(
            (isinstance(pa[k], np.ndarray) and isinstance(pb[k], np.ndarray) and pa[k].dtype == pb[k].dtype
             and np.array_equal(pa[k], pb[k])) if isinstance(pa[k], np.ndarray) else pa[k] == pb[k] for k in pa)
        if not same:
            bad.append(f"{stage}/{uid}")
    return bad
