"""`pipeq worker <deployment>`: one process, one model, one device, one queue.

Order matters: the GPU is chosen (CUDA_VISIBLE_DEVICES) before torch is imported, the
model is loaded once before the worker takes a job, and the worker runs Celery's
threads pool, so nothing forks after CUDA is initialised. The jobs' threads hand their
items to the batcher thread, the only one that touches the model.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future, wait
from typing import Any

import redis
from celery import Celery, signals, states
from celery.exceptions import Ignore
from celery.worker.consumer import Consumer as CeleryConsumer

from pipeq import _app, _tasks
from pipeq._client import cancel_key
from pipeq._config import Deployment
from pipeq._registry import HEARTBEAT_S, Registry
from pipeq.errors import (
    JobCancelled,
    JobFailed,
    JobLost,
    JobTimeout,
    ModelLoadError,
    PipeqError,
)

log = logging.getLogger("pipeq.worker")

__all__ = ["EVENT_FLUSH_S", "EXIT_MODEL_LOAD_FAILED", "MAX_ATTEMPTS", "Consumer", "run_worker"]

#: a job delivered this many times without finishing (it kills its worker) fails
MAX_ATTEMPTS = 3
#: exit status of a worker whose model could not be loaded
EXIT_MODEL_LOAD_FAILED = 3
#: a job's events for Flower (received, started, succeeded...) go out this long after
#: they happen, together with every other job's of that span, in one message
EVENT_FLUSH_S = 0.1


def pin_device(deployment: Deployment, gpu: int | None) -> Deployment:
    """Restrict this process to one GPU before torch is imported; return the deployment."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        return Deployment(**{**deployment.to_dict(), "device": f"cuda:{gpu}"})
    if deployment.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = deployment.device.split(":", 1)[1]
    elif deployment.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return deployment


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, publishing buffered task events a moment later, not at once.

    Celery publishes a job's events as soon as the consumer's loop turns, which lands
    in the middle of the job it describes: a single job on an idle worker took
    0.4-0.7 ms longer with events on than off (docs/batching.md). Flushed
    `EVENT_FLUSH_S` later, they leave the job's path, and under load one message
    carries the events of many jobs. Each event keeps the time it happened at.
    """

    _flush_due = False

    def on_send_event_buffered(self) -> None:
        # called from job threads too; kombu's timer takes entries from other threads
        if self.hub and not self._flush_due:
            self._flush_due = True
            self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_due = False
        self._flush_events()

    def shutdown(self) -> None:
        self._flush_events()  # the timer will not fire again: send what it holds
        super().shutdown()


def _free_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _as_job_error(e: BaseException) -> PipeqError:
    if isinstance(e, PipeqError):
        return e
    return JobFailed(f"{type(e).__name__}: {e}")


def _outcome(value: Any, to_jsonable: Any) -> dict[str, Any]:
    """One item of a per-item job: {"result": ...} or {"error": [type, message]}."""
    if isinstance(value, BaseException):
        e = _as_job_error(value)
        return {"error": [type(e).__name__, e.message]}
    return {"result": to_jsonable(value)}


class Admission:
    """Before a batch runs, in one Redis round trip: see which of its jobs were cancelled
    and, for each job reaching the model for the first time in this delivery, count the
    attempt and mark it STARTED. `__call__` returns the jobs that must not run."""

    def __init__(self, app: Celery, store: redis.Redis) -> None:
        self.app = app
        self.store = store
        self.running: set[str] = set()  # jobs of this process already admitted once

    def done(self, job_id: str) -> None:
        self.running.discard(job_id)

    def __call__(self, job_ids: list[str]) -> dict[str, BaseException]:
        backend = self.app.backend
        first = [j for j in job_ids if j not in self.running]
        pipe = self.store.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(cancel_key(job_id))
        for job_id in first:
            pipe.incr(attempts_key(job_id))
            pipe.expire(attempts_key(job_id), _app.RESULT_TTL_S)
            key = backend.get_key_for_task(job_id)
            meta = backend.encode(
                {
                    "status": states.STARTED,
                    "result": None,
                    "traceback": None,
                    "children": [],
                    "date_done": None,
                    "task_id": job_id,
                }
            )
            pipe.setex(key, backend.expires, meta)
            pipe.publish(key, meta)
        replies = pipe.execute()
        self.running.update(first)
        refused: dict[str, BaseException] = {}
        for job_id, cancelled in zip(job_ids, replies, strict=False):
            if cancelled:
                refused[job_id] = JobCancelled("the job was cancelled")
        for n, job_id in enumerate(first):
            attempts = replies[len(job_ids) + 4 * n]
            if attempts > MAX_ATTEMPTS:
                refused[job_id] = JobLost(f"delivered {attempts} times without finishing")
        return refused


def attempts_key(job_id: str) -> str:
    return f"pipeq:attempts:{job_id}"


def _wait(futures: list[Future[Any]], timeout_s: float) -> list[Any]:
    """Each future's result, or its error; JobTimeout for those not done in time."""
    _, not_done = wait(futures, timeout=timeout_s)
    for f in not_done:
        f.cancel()
    late = JobTimeout(f"no result within job_timeout_s={timeout_s}")
    return [late if f in not_done else (f.exception() or f.result()) for f in futures]


def register_task(app: Celery, deployment: Deployment, batcher: Any, admission: Admission) -> None:
    """The one task this worker runs: hand the job's items to the batcher, wait."""
    task = deployment.task

    @app.task(name=_app.RUN_TASK, bind=True)  # type: ignore[untyped-decorator]
    def run(self: Any, inputs: Any, params: dict[str, Any], per_item: bool = False) -> Any:
        """One job. `per_item`: items fail alone, the result is one outcome per item."""
        try:
            return run_job(self.request.id, inputs, params, per_item)
        finally:
            admission.done(self.request.id)

    def run_job(job_id: str, inputs: Any, params: dict[str, Any], per_item: bool) -> Any:
        from pipeq.worker.handlers import to_jsonable

        params = _tasks.validate_params(task, params)
        if not per_item:
            items, many = _tasks.split_items(task, inputs)
            results = _wait(batcher.submit(job_id, items, params), deployment.job_timeout_s)
            for r in results:
                if isinstance(r, JobCancelled):
                    app.backend.mark_as_revoked(job_id, "cancelled by the producer")
                    raise Ignore()
                if isinstance(r, BaseException):
                    raise _as_job_error(r)
            return to_jsonable(_tasks.combine(task, params, results) if many else results[0])
        items, _ = _tasks.items_of(task, inputs)
        outcomes, good = _tasks.sort_out(
            items, lambda item, where: _tasks.check_item(task, item, where)
        )
        results = _wait(
            batcher.submit(job_id, [items[i] for i in good], params), deployment.job_timeout_s
        )
        for i, r in zip(good, results, strict=True):
            outcomes[i] = r
        return [_outcome(o, to_jsonable) for o in outcomes]


def _heartbeat(
    registry: Registry,
    name: str,
    hostname: str,
    info: dict[str, Any],
    batcher: Any,
    stop: threading.Event,
) -> None:
    registry.announce(name, info, hostname)
    while not stop.wait(HEARTBEAT_S):
        try:
            registry.heartbeat(name, hostname, batcher.stats.as_dict())
        except redis.RedisError as e:  # Redis away for a moment: try again next beat
            log.warning("heartbeat failed: %s", e)


def run_worker(
    deployment: Deployment,
    *,
    redis_url: str | None = None,
    gpu: int | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
) -> int:
    """Load the model, then consume the deployment's queue until told to stop."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per job received and done, with the result's repr, costs more than a small
    # model's forward pass; Flower shows every job, and --loglevel DEBUG brings them back
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    deployment = pin_device(deployment, gpu)
    # torch's OpenMP threads otherwise spin for a while after each forward pass, taking the
    # cores from the job threads, Redis and producers on the same host; sleeping at once
    # costs the forward pass nothing measurable (docs/batching.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # jobs hand items to the batcher thread and back: hand the GIL over sooner than the
    # default 5 ms, or each hand-over can wait that long behind a busy thread
    sys.setswitchinterval(0.0005)
    url = _app.redis_url(redis_url)
    registry = Registry(redis.Redis.from_url(url))
    hostname = f"pipeq.{deployment.name}.{os.getpid()}@{socket.gethostname()}"

    from pipeq.worker.batcher import Batcher
    from pipeq.worker.handlers import load_handler

    started = time.monotonic()
    try:
        handler = load_handler(deployment)
    except ModelLoadError as e:
        print(f"pipeq worker {deployment.name}: {e.message}", file=sys.stderr, flush=True)
        try:
            registry.load_failed(deployment.name, deployment.to_dict(), e.message)
        except redis.RedisError:
            pass
        return EXIT_MODEL_LOAD_FAILED
    log.info("loaded %s in %.1f s", deployment.model, time.monotonic() - started)

    # task_track_started is off: Admission marks jobs running
    app = _app.make_app(url, worker_consumer=f"{__name__}:Consumer")
    admission = Admission(app, registry.redis)
    batcher = Batcher(
        handler.run,
        max_batch_size=deployment.max_batch_size,
        max_batch_wait_ms=deployment.max_batch_wait_ms,
        admit=admission,
        on_oom=_free_cuda_memory,
        size=handler.size,
    ).start()
    register_task(app, deployment, batcher, admission)
    stop = threading.Event()

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: Any) -> None:
        threading.Thread(
            target=_heartbeat,
            args=(registry, deployment.name, hostname, handler.info(), batcher, stop),
            name="pipeq-heartbeat",
            daemon=True,
        ).start()

    @signals.worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def _going(**_: Any) -> None:
        stop.set()
        try:
            registry.withdraw(deployment.name, hostname)
        except redis.RedisError:
            pass

    # each job thread holds one prefetched job: the batcher sorts by length among this many,
    # and 8 batches' worth groups better than 4 (docs/batching.md); more hoards jobs that
    # another worker of the deployment could run
    threads = concurrency or max(16, 8 * deployment.max_batch_size)
    app.worker_main(
        [
            "worker",
            f"--queues={_app.queue_for(deployment.name)}",
            "--pool=threads",
            f"--concurrency={threads}",
            f"--hostname={hostname}",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={loglevel}",
        ]
    )
    stop.set()
    batcher.stop()
    return 0
