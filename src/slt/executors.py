"""Fan independent jobs out: in this process, on a process pool, or on a Ray cluster.

A job is ``function(shared, job)``: ``function`` a module-level function, ``shared`` what
every job needs (sent once per worker), ``job`` a small picklable spec. Each job seeds its
own randomness, so the executor changes where a job runs, not its numbers, as long as
PyTorch runs it on as many threads: a pool or Ray worker sets ``threads_per_worker``
(default 1), ``"serial"`` keeps the caller's ``torch.get_num_threads()``, and a different
count splits sums differently and changes λ̂ in its last digits (float32 rounding).

- ``"serial"``: in this process, in order. Nothing needs to pickle.
- ``"process"``: a :class:`concurrent.futures.ProcessPoolExecutor` with the ``"spawn"``
  start method (no forked CUDA or thread state); ``shared`` and the jobs must pickle with
  the standard :mod:`pickle`, so functions must be importable by their module and name
  (or live in a file given to :func:`load_file_module`, which each worker loads first).
- ``"ray"``: Ray tasks (``pip install 'slt[ray]'``); connects to a running cluster
  (``RAY_ADDRESS``) or starts a local one if Ray is not initialized. ``shared`` goes to
  the object store once. Ray pickles with cloudpickle, so lambdas and closures work, and
  what a file module from :func:`load_file_module` defines goes by value (a worker could
  not import it by name). Each task asks for one GPU when the cluster has any.

Results are handed to ``on_result(job, result)`` in the calling process as each job
finishes, in completion order. The first job that raises (or an interrupt) stops the jobs
not yet started and re-raises; Ray cancels the running ones too, while a process pool's
running jobs cannot be stopped: the pool waits for them, and what they return still goes to
``on_result`` before the error is re-raised (a trajectory keeps their rows).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

EXECUTORS = ("serial", "process", "ray")

_WORKER_SHARED: Any = None  # what a pool worker received at start-up
_WORKER_ERROR: Exception | None = None  # why a pool worker could not start, if it could not
_FILE_MODULES: dict[str, str] = {}  # module name -> the file it was loaded from


def run_jobs(
    function: Callable[[Any, Any], Any],
    shared: Any,
    jobs: Sequence[Any],
    on_result: Callable[[Any, Any], None],
    *,
    executor: str = "serial",
    max_workers: int | None = None,
    threads_per_worker: int | None = 1,
    gpus_per_job: float | str = "auto",
) -> None:
    """Run ``function(shared, job)`` for every job; ``on_result(job, result)`` as each ends.

    Parameters
    ----------
    executor : {"serial", "process", "ray"}
    max_workers : int, optional
        Pool size for ``"process"`` (default: the number of CPUs, at most the jobs).
    threads_per_worker : int or None
        ``torch.set_num_threads`` in each pool or Ray worker (default 1: many small jobs
        side by side); None leaves PyTorch's default. ``"serial"`` never changes it; its
        numbers equal a pool's bit for bit when the caller runs this many threads.
    gpus_per_job : float or "auto"
        GPUs each Ray task asks for; "auto" is 1 when the cluster has GPUs, else 0.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if not jobs:
        return
    if executor == "serial":
        for job in jobs:
            on_result(job, function(shared, job))
    elif executor == "process":
        _run_process(function, shared, jobs, on_result, max_workers, threads_per_worker)
    else:
        _run_ray(function, shared, jobs, on_result, threads_per_worker, gpus_per_job)


def check_picklable(named: dict[str, Any], executor: str) -> None:
    """Raise ``TypeError`` naming the first value that the standard pickle cannot send."""
    for name, value in named.items():
        try:
            pickle.dumps(value)
        except Exception as err:
            raise TypeError(
                f"executor={executor!r} sends {name} to worker processes by pickling, and "
                f"{name}={value!r} does not pickle ({type(err).__name__}: {err}). Define it at "
                "the top level of an importable module (a functools.partial of such a "
                "function or class also works); lambdas, nested functions and closures do "
                "not pickle. Or use executor='serial', or 'ray' (which uses cloudpickle)."
            ) from None


def load_file_module(name: str, path: str | os.PathLike):
    """Import the Python file ``path`` as module ``name`` (its folder on ``sys.path``, as for
    a script), once; pool workers load it too before unpickling what refers to it, and Ray
    gets what it defines by value."""
    import importlib.util
    import sys

    path = os.path.abspath(path)
    if name not in sys.modules:
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # its sibling modules
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    _FILE_MODULES[name] = path
    return sys.modules[name]


def _init_worker(payload: bytes, threads: int | None, modules: dict[str, str],
                 dtype=None) -> None:  # fmt: skip
    global _WORKER_SHARED, _WORKER_ERROR
    try:
        _set_threads(threads)
        _set_dtype(dtype)
        for name, path in modules.items():
            load_file_module(name, path)
        _WORKER_SHARED = pickle.loads(payload)
    except Exception as err:  # said by the first job, not as a pool that broke
        _WORKER_ERROR = err


def _live_file_modules() -> dict[str, str]:
    """The file modules this process still holds, whose files still exist."""
    import sys

    return {
        name: path
        for name, path in _FILE_MODULES.items()
        if name in sys.modules and os.path.isfile(path)
    }


def _call_in_worker(function, job):
    if _WORKER_ERROR is not None:
        err = _WORKER_ERROR
        raise RuntimeError(
            f"a worker process could not set up ({type(err).__name__}: {err}). What "
            "llc_trajectory sends it must import in a fresh process: a function defined in "
            "a notebook or an interactive session pickles by a name the worker does not "
            "have; define it in an importable module, or use executor='serial'"
        ) from err
    return function(_WORKER_SHARED, job)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _set_dtype(dtype) -> None:
    """The caller's ``torch.get_default_dtype()``: a fresh process starts at float32."""
    if dtype is not None:
        import torch

        torch.set_default_dtype(dtype)


def _run_process(function, shared, jobs, on_result, max_workers, threads):
    import torch

    workers = max_workers or min(len(jobs), os.cpu_count() or 1)
    payload = pickle.dumps(shared)
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker,
        initargs=(payload, threads, _live_file_modules(), torch.get_default_dtype()),
    ) as pool:  # fmt: skip
        futures = {pool.submit(_call_in_worker, function, job): job for job in jobs}
        handled, written = set(), set()
        try:
            for future in cf.as_completed(futures):
                handled.add(future)
                on_result(futures[future], future.result())
                written.add(future)
        except cf.process.BrokenProcessPool as err:
            # a worker died (killed for memory, a crash, os._exit): the pool then stops the
            # others, whose jobs are lost with it; the rows written before stay
            lost = [futures[f].label for f in futures if f not in written]
            raise RuntimeError(
                f"a worker process died (killed for memory, a crash in native code, or "
                f"os._exit) while the pool ran {len(lost)} checkpoint(s) not yet written: "
                f"{', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''}. The rows written "
                "before are kept; rerun to resume (with fewer max_workers if memory ran out)"
            ) from err
        except BaseException:
            for future in futures:
                future.cancel()
            # the running ones finish regardless (a worker cannot be stopped mid-job): keep
            # what they return, then re-raise
            for future in cf.as_completed([f for f in futures if not f.cancelled()]):
                if future not in handled and future.exception() is None:
                    on_result(futures[future], future.result())
            raise


def _ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "executor='ray' needs Ray, which is not installed: pip install 'slt[ray]'"
        ) from err
    return ray


def _ray_task(function, shared, job, threads, dtype=None):
    _set_threads(threads)
    _set_dtype(dtype)
    return function(shared, job)


@contextlib.contextmanager
def _file_modules_by_value():
    """Have Ray's cloudpickle send the functions and classes of the file modules this
    process loaded by value, not by reference: a Ray worker (perhaps on another machine)
    cannot import a module by a name that only this process gave a file. Undone after."""
    import sys

    from ray import cloudpickle

    already = set(cloudpickle.list_registry_pickle_by_value())
    modules = [sys.modules[name] for name in _FILE_MODULES if name in sys.modules]
    modules = [module for module in modules if module.__name__ not in already]
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def _run_ray(function, shared, jobs, on_result, threads, gpus_per_job):
    ray = _ray()
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS if set, else a local cluster
    import torch

    resources = ray.cluster_resources()
    if gpus_per_job == "auto":
        gpus_per_job = 1 if resources.get("GPU", 0) > 0 else 0
    for name, asked, key in (("threads_per_worker", threads or 1, "CPU"),
                             ("gpus_per_job", gpus_per_job, "GPU")):  # fmt: skip
        if asked > resources.get(key, 0):
            # Ray would wait for such a node for ever, saying only "no available node types"
            raise ValueError(
                f"{name}={asked} asks each Ray task for {asked} {key}(s), and the cluster has "
                f"{resources.get(key, 0):g}: no task could ever be scheduled; lower {name}"
            )
    task = ray.remote(_ray_task).options(num_cpus=threads or 1, num_gpus=gpus_per_job)
    dtype = torch.get_default_dtype()
    with _file_modules_by_value():  # ray.put and .remote pickle here, at once
        shared_ref = ray.put(shared)
        pending = {task.remote(function, shared_ref, job, threads, dtype): job for job in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                on_result(pending.pop(ref), ray.get(ref))
    except BaseException:
        # keep what finished meanwhile (a failed job found first in one wait hid the others
        # that were done), then stop the rest: queued tasks never start, running ones are
        # interrupted (Ray cannot tell the two apart cheaply)
        ready = ray.wait(list(pending), num_returns=len(pending), timeout=0)[0] if pending else []
        for ref in ready:
            try:
                result = ray.get(ref)
            except Exception:  # noqa: BLE001 - the first error is the one raised
                continue
            on_result(pending.pop(ref), result)
        for ref in pending:
            ray.cancel(ref)
        raise
