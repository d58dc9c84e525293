"""Where a sweep's runs execute: the executor interface and its two implementations.

`LocalExecutor` is a process pool on this machine; given GPU ids it pins one GPU per worker
process through CUDA_VISIBLE_DEVICES, so a multi-GPU host runs one run per GPU. `RayExecutor`
submits one Ray task per run with its GPU request (`num_gpus`) and retries a task whose worker
died. Both call `execute_run` in the worker and hand every result (or error) back to the driver's
`on_done`, which files it: workers never write the results database.

Every way the driver ends stops the tools it started. A tool dies with the worker that runs it
(`die_with_parent` in the tools' runner, so a worker killed outright leaves no llama.cpp behind).
The driver stops local workers with SIGTERM when it leaves early (Ctrl-C, SIGTERM, an error), and
a local worker gets SIGTERM from the kernel if the driver dies; a worker turns SIGTERM into
`Terminated` inside a run, so the run's tool is stopped and its temporary files removed, and then
exits. Ray's tasks are cancelled with force, which kills their workers, and with them their tools.

Ray and the workers share lacq's home and the model files by path (one machine, or nodes with
the same shared filesystem mounted at the same path, and lacq importable on every node).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import signal
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import SyncManager
from typing import Callable

from lacq.errors import LacqError, SweepError, Terminated
from lacq.llama.tools.base import die_with_parent
from lacq.studies.engine import visible_gpus
from lacq.studies.sweep import SweepRun, WorkerSetup, close_engines, execute_run

OnDone = Callable[[SweepRun, "dict | None", "str | None"], None]  # (run, stored row, error message)
OnProgress = Callable[[str, float, str], None]  # (run key, fraction, detail)
EXECUTORS = ("local", "ray")


def _message(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class SweepExecutor(ABC):
    name: str

    @abstractmethod
    def run(self, runs: list[SweepRun], setup: WorkerSetup, on_done: OnDone, on_progress: OnProgress | None) -> None:
        """Execute every run; call `on_done` once per run, in the driver's thread, as each finishes."""


# ---------------------------------------------------------------- local
_progress_queue = None  # set in each pool worker by _init_worker
_in_run = False  # whether this worker is inside a run (where SIGTERM unwinds instead of exiting at once)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the cleanup short
    if _in_run:
        raise Terminated(signum)
    os._exit(128 + signum)


def _die_with_driver(driver: int) -> None:
    """SIGTERM from the kernel when the driver dies, even by SIGKILL. The driver's main thread, which
    lives as long as the driver, starts the workers (ProcessPoolExecutor.submit) and the manager."""
    die_with_parent(signal.SIGTERM, driver)


def _init_worker(driver: int, gpu_ids, progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A terminal's Ctrl-C reaches the driver and its workers alike; the driver alone acts on it
    # and stops the workers with SIGTERM, so that every way out takes one path.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_driver(driver)
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids.get()


def _local_task(run: SweepRun, setup: WorkerSetup) -> dict:
    global _in_run
    report = (lambda key, f, d: _progress_queue.put((key, f, d))) if _progress_queue is not None else None
    _in_run = True
    try:
        return execute_run(run, setup, report)
    except Terminated as exc:
        # Unwound: the tool's process group is stopped and the run's temporary files removed. Exit
        # rather than return, or the pool would hand this worker the next queued run.
        os._exit(128 + exc.signum)
    finally:
        _in_run = False


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker of the pool, so that shutting it down does not wait for their runs.
    (`_processes` is the pool's own table of its worker processes; there is no public one.)"""
    for proc in list((pool._processes or {}).values()):
        if proc.is_alive():
            proc.terminate()


class LocalExecutor(SweepExecutor):
    name = "local"

    def __init__(self, jobs: int = 1, gpus: list[str] | None = None):
        if gpus:
            jobs = min(jobs, len(gpus)) if jobs else len(gpus)
        if jobs < 1:
            raise SweepError(f"--jobs must be at least 1, got {jobs}")
        self.jobs, self.gpus = jobs, gpus or None

    def run(self, runs, setup, on_done, on_progress) -> None:
        ctx = multiprocessing.get_context("spawn")
        manager = SyncManager(ctx=ctx)
        manager.start(_die_with_driver, (os.getpid(),))
        with manager:
            progress_q = manager.Queue()
            gpu_q = None
            if self.gpus:
                gpu_q = manager.Queue()
                for g in self.gpus[:self.jobs]:
                    gpu_q.put(g)
            pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_init_worker,
                                       initargs=(os.getpid(), gpu_q, progress_q))
            try:
                pending = {pool.submit(_local_task, r, setup): r for r in runs}
                while pending:
                    finished, _ = wait(pending, timeout=0.3, return_when=FIRST_COMPLETED)
                    _drain(progress_q, on_progress)
                    for fut in finished:
                        run = pending.pop(fut)
                        try:
                            row = fut.result()
                        except BrokenProcessPool:
                            raise LacqError("a sweep worker process died (killed, or out of memory); finished "
                                            "runs are stored: run the same command to resume") from None
                        except Exception as exc:  # a failed run: recorded, the others go on
                            on_done(run, None, _message(exc))
                        else:
                            on_done(run, row, None)
                _drain(progress_q, on_progress)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                _stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)


def _drain(q, on_progress) -> None:
    while True:
        try:
            item = q.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        if on_progress:
            on_progress(*item)


# ---------------------------------------------------------------- Ray
def _ray_task(run: SweepRun, setup: WorkerSetup, progress_q) -> dict:
    def report(key, f, d):
        try:
            progress_q.put_nowait((key, f, d))
        except Exception:  # progress is best effort; the result is what matters
            pass

    try:
        return execute_run(run, setup, report if progress_q is not None else None)
    finally:
        if run.gpus:  # Ray gives this worker's next task any GPU: an engine kept here would hold this one's memory
            close_engines()


def import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("the ray executor needs Ray, which is not installed: pip install 'lacq[ray]' "
                         "(or use --executor local)") from None
    return ray


class RayExecutor(SweepExecutor):
    """One Ray task per run. `address` None starts a local cluster with `jobs` CPUs (and the GPUs
    Ray detects); otherwise connects to a running cluster ("auto", "ray://host:10001", ...)."""

    name = "ray"

    def __init__(self, address: str | None = None, jobs: int | None = None, max_retries: int = 2):
        self.ray = import_ray()
        self.address, self.jobs, self.max_retries = address, jobs, max_retries

    def run(self, runs, setup, on_done, on_progress) -> None:
        ray = self.ray
        started = False
        if not ray.is_initialized():
            kwargs = {"num_cpus": self.jobs} if self.address is None and self.jobs else {}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **kwargs)
            started = True
        try:
            from ray.util.queue import Queue
            progress_q = Queue() if on_progress else None
            task = ray.remote(_ray_task)
            refs = {}
            for r in runs:
                opts = {"num_cpus": 1, "num_gpus": r.gpus, "max_retries": self.max_retries, "retry_exceptions": False}
                refs[task.options(**opts).remote(r, setup, progress_q)] = r
            try:
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.3)
                    if progress_q is not None:
                        while not progress_q.empty():
                            on_progress(*progress_q.get_nowait())
                    for ref in ready:
                        run = refs.pop(ref)
                        try:
                            row = ray.get(ref)
                        except ray.exceptions.RayTaskError as exc:
                            on_done(run, None, _message(exc.cause if getattr(exc, "cause", None) else exc))
                        except ray.exceptions.RayError as exc:  # worker or node lost beyond the retries
                            on_done(run, None, f"lost after {self.max_retries} retries: {_message(exc)}")
                        else:
                            on_done(run, row, None)
            except BaseException:
                for ref in refs:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started:
                ray.shutdown()


def make_executor(name: str, *, address: str | None = None, jobs: int | None = None, backend: str = "cpu"):
    if name == "local":
        if address:
            raise SweepError("--address is for --executor ray")
        gpus = visible_gpus() if backend == "cuda" else None
        return LocalExecutor(jobs or (len(gpus) if gpus else 1), gpus)
    if name == "ray":
        return RayExecutor(address, jobs)
    raise SweepError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
