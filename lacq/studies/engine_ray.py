"""A scan's engines on a Ray cluster: one engine per actor, each loading the model once on its node.

The driver keeps the scan (the jobs, the journal, the results database); each of its measuring threads has
an actor, sends it one variant at a time and files the answer itself, so results are stored once, by the
driver. An actor lost mid-variant (its worker or node killed) is replaced and the variant sent to its
successor, once: a lost worker costs only the variant it had in flight. Each actor checks, before its engine
starts, that the model and candidates fit in its node's memory (on its GPU where Ray gave it one).

Like `lacq sweep --executor ray`, the nodes see the model, candidate and logits files by the same paths (one
machine, or a shared filesystem) and can import lacq.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

from lacq.errors import LacqError
from lacq.studies.engine import Answer, EngineError, Engines, MemoryPlan, check_memory
from lacq.studies.sweep_exec import import_ray

log = logging.getLogger(__name__)


class EngineActor:
    """Runs in a Ray worker: one engine, started on the first variant after the memory check."""

    def __init__(self, args: list[str], plan: Callable[[], MemoryPlan]):
        self.engines, self.plan, self.checked = Engines(args), plan, False

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, label: str, tensors: Mapping[str, str], kv_args: list[str],
                 kv_env: Mapping[str, str]) -> Answer:
        if not self.checked:
            check_memory(self.plan())
            self.checked = True
        return self.engines.evaluate(label, tensors, kv_args, kv_env)

    def close(self) -> None:
        self.engines.close()


class RayEngines:
    """`jobs` engine actors (None: one per GPU of the cluster with `gpu`, else 1), one per measuring thread of
    the driver. `address` None joins the cluster this process already started, or starts a local one."""

    def __init__(self, address: str | None = None, jobs: int | None = None, gpu: bool = False):
        self.address, self.jobs, self.gpu = address, jobs, gpu
        self.ray = import_ray()
        self.actors = 0  # known once started
        self._started = False
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def __call__(self, args: list[str], plan: Callable[[], MemoryPlan]) -> RayEngines:
        """Join or start the cluster (EngineSession calls this with the engine's argv and memory plan)."""
        ray = self.ray
        if not ray.is_initialized():
            local = {"num_cpus": self.jobs} if self.address is None and self.jobs else {}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **local)
            self._started = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if self.gpu and not gpus:
            self.close()
            raise EngineError("the Ray cluster has no GPU for this build's engines (its backend is not cpu)")
        self.actors = self.jobs or (gpus if self.gpu else 1)
        self._actor_class = ray.remote(EngineActor).options(num_cpus=1, num_gpus=1 if self.gpu else 0)
        self._args, self._plan = args, plan
        log.info("%d engine actor(s) on Ray (%s)", self.actors, self.address or "local cluster")
        return self

    def _actor(self):
        actor = getattr(self._local, "actor", None)
        if actor is None:
            actor = self._actor_class.remote(self._args, self._plan)
            with self._lock:
                self._all.append(actor)
            self._local.actor = actor
        return actor

    def evaluate(self, label: str, tensors: Mapping[str, str], kv_args: list[str],
                 kv_env: Mapping[str, str]) -> Answer:
        ray = self.ray
        for attempt in (1, 2):
            actor = self._actor()
            try:
                return ray.get(actor.evaluate.remote(label, dict(tensors), list(kv_args), dict(kv_env)))
            except ray.exceptions.RayTaskError as exc:  # raised in the actor: the engine's own error
                cause = getattr(exc, "cause", None)
                if isinstance(cause, LacqError):
                    raise cause from None
                raise EngineError(f"the Ray actor measuring {label} failed: {str(exc).strip().splitlines()[0]}") \
                    from None
            except ray.exceptions.RayActorError as exc:  # its worker or node is gone
                self._local.actor = None
                if attempt == 2:
                    raise EngineError(f"the Ray actor measuring {label} was lost twice; finished variants are "
                                      "stored: run the same command to resume") from None
                log.warning("the Ray actor measuring %s was lost (%s); measuring it on a new one", label,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop every engine (an actor's close ends its engine; killing the actor would too), then the cluster
        where this process started it."""
        ray = self.ray
        with self._lock:
            actors, self._all = self._all, []
        try:
            ray.get([a.close.remote() for a in actors], timeout=15)
        except Exception as exc:  # noqa: BLE001 (a lost actor has no engine left to close)
            log.debug("closing the engine actors: %s", exc)
        for a in actors:
            ray.kill(a)
        if self._started:
            self._started = False
            ray.shutdown()
