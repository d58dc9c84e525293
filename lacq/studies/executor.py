"""A small job executor for studies: pure job descriptions in, stored results out, resumable.

A job is a frozen description with a `key`; running it stores one result in the
results database under the study's name and that key as its label. The store is
the journal: a job whose key is already stored for the study is not run again,
so Ctrl-C (or a crash) followed by the same command loses nothing finished and
repeats nothing. Jobs run serially, or `jobs` at a time on threads (the work is
in llama.cpp subprocesses); each thread opens its own database connection.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence

from lacq.llama.tools.base import terminate_running
from lacq.results.store import Store


@dataclass(frozen=True)
class Job:
    key: str  # the label its result is stored under, unique within the study
    spec: Hashable  # what to run; interpreted by the study's runner


Runner = Callable[[Job, Store], int]  # runs one job, stores its result, returns the result id
Progress = Callable[[int, int, str], None]  # (done, total, key of the job just done)


def run_jobs(jobs: Sequence[Job], runner: Runner, store: Store, study: str, *, workers: int = 1,
             progress: Progress | None = None) -> dict[str, int]:
    """Run the jobs not yet stored for `study`; return key -> result id for every job."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("job keys must be unique within a study")
    done = {r.label: r.id for r in store.results(study=study) if r.label in set(keys)}
    todo = [j for j in jobs if j.key not in done]
    if progress:
        progress(len(done), len(jobs), "")
    if workers <= 1:
        for job in todo:
            done[job.key] = runner(job, store)
            if progress:
                progress(len(done), len(jobs), job.key)
        return done
    local = threading.local()

    def run(job: Job) -> int:
        if not hasattr(local, "store"):
            local.store = Store(Path(store.path))
        return runner(job, local.store)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = {pool.submit(run, j): j for j in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                done[job.key] = fut.result()
                if progress:
                    progress(len(done), len(jobs), job.key)
    except BaseException:
        # Ctrl-C reaches this thread only: drop queued jobs and stop the tools the others run.
        for fut in pending:
            fut.cancel()
        terminate_running()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return done
