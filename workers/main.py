"""`pipeq worker <deployment>`: one process, one model, one device, one queue.

Order matters: the GPU is chosen (CUDA_VISIBLE_DEVICES) before torch is imported, the
model is loaded once before the worker takes a job, and the worker runs Celery's
threads pool, so nothing forks after CUDA is initialised. The jobs' threads hand their
items to the batcher thread, the only one that touches the model.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from celery.exceptions import Reject
from celery.worker.consumer import Consumer as CeleryConsumer

from pipeq import _app
from pipeq._config import Deployment
from pipeq._ledger import inflight_key, queue_for
from pipeq._metrics import Observations
from pipeq._redis import masked, scrub
from pipeq._registry import Registry
from pipeq.errors import InvalidRequest, JobLost, ModelLoadError
from pipeq.worker import revoke  # noqa: F401  (Celery's revoke, as Job.cancel() does it)
from pipeq.worker.gate import Malformed
from pipeq.worker.jobs import Admission, Events, register_task
from pipeq.worker.liveness import Heartbeat, Lease, LivenessSettings

log = logging.getLogger("pipeq.worker")

__all__ = [
    "EVENT_FLUSH_S",
    "EXIT_FATAL",
    "EXIT_MODEL_LOAD_FAILED",
    "Consumer",
    "run_worker",
]

#: exit status of a worker whose model could not be loaded
EXIT_MODEL_LOAD_FAILED = 3
#: exit status of a worker that stopped on an error it cannot go on from
EXIT_FATAL = 1
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

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        def info(self, parent: Any) -> dict[str, Any]:
            """Every step's part of the `inspect stats` reply (Flower's worker page),
            without the broker's transport options: they hold the worker's hooks (not
            JSON: the reply failed) and, on Sentinel, the sentinels' password (Celery
            drops only the broker's). Taken out after the steps merged their parts: a
            subclass of the Connection step ran beside Celery's own (other steps require
            it by name), in an order that varied per process, and when Celery's came last
            the hooks went out and the reply failed (a worker in three or four)."""
            info: dict[str, Any] = super().info(parent)
            if isinstance(info.get("broker"), dict):
                info["broker"].pop("transport_options", None)
            return info

    _flush_due = False
    #: where the worker's own task events (started, revoked) find this consumer
    events: Events | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.events is not None:
            self.events.consumer = self

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


def _gpu_memory() -> dict[str, int]:
    """The GPU memory this worker's process holds (PyTorch's caching allocator: what an
    out-of-memory error is about) and its GPU's total, in bytes; {} on a CPU worker."""
    import torch

    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if not (torch.cuda.is_available() and initialized):
        return {}
    device = torch.cuda.current_device()
    return {
        "gpu_memory_used_bytes": int(torch.cuda.memory_reserved(device)),
        "gpu_memory_total_bytes": int(torch.cuda.mem_get_info(device)[1]),
    }


def _max_message_bytes(deployment: Deployment) -> int:
    """The largest message the gate reads: a request at its byte limit, base64-encoded
    (4/3), twice over for Flower's copy of the arguments, plus the envelope."""
    return 3 * int(deployment.limits["request_bytes"]) + 65536


#: a heartbeat's Redis call that takes longer than this fails (and is tried again)
HEARTBEAT_IO_S = 5.0
#: a worker holds this many batches' worth of jobs: the one running and three behind it,
#: among which it groups inputs by length; the rest stay in Redis, for any worker of the
#: deployment. Measured (docs/batching.md): 4 batches group as well as 8, 2 lose a fifth
#: of the throughput to padding.
HELD_BATCHES = 4
#: and room for this many batches' worth of high jobs beside them (docs/scale.md,
#: Priorities): a high job is taken while the worker is full, and runs in the next batch
HIGH_ROOM_BATCHES = 1
#: connections the result backend opens at most, shared by every job thread (the batcher's
#: admission, the heartbeat, and the threads storing results); a thread past it waits for
#: one. Before, a worker opened about one per job thread: 200 at max_batch_size 256.
BACKEND_CONNECTIONS = 2
#: an idle worker's wait for a job (BLMOVE's timeout), and its worker-heartbeat event's
#: interval (s): what an idle worker sends Redis, with its pipeq heartbeat (every 2 s)
IDLE_WAIT_S = 5.0
EVENT_HEARTBEAT_S = 10


def _redis_failed(name: str, url: str, e: Exception) -> int:
    """One line on stderr saying why Redis cannot be used; the exit status."""
    why = scrub(" ".join(f"{type(e).__name__}: {e}".split()), url)  # a server may echo it
    print(f"pipeq worker {name}: Redis at {masked(url)} did not answer ({why})", file=sys.stderr)
    return EXIT_FATAL


def _handed_back(record: logging.LogRecord) -> bool:
    """Celery's warning, with a traceback, for each job a stopping worker hands back
    (`Reject(requeue=True)`): the worker says it once, with the count."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, Reject) and exc.requeue)


def _set_up_logging(loglevel: str) -> None:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per job received and done, with the result's repr, costs more than a small
    # model's forward pass; Flower shows every job, and --loglevel DEBUG brings them back
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    logging.getLogger("celery.app.trace").addFilter(_handed_back)


def run_worker(
    deployment: Deployment,
    *,
    redis_url: str | None = None,
    gpu: int | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    liveness: LivenessSettings | None = None,
) -> int:
    """Load the model, then consume the deployment's queue until told to stop.

    Returns the exit status: 0 after a requested stop (SIGTERM, SIGINT), 3 when the
    model could not be loaded, non-zero when the worker stopped on an error."""
    _set_up_logging(loglevel)
    liveness = liveness or LivenessSettings()
    deployment = pin_device(deployment, gpu)
    # torch's OpenMP threads otherwise spin for a while after each forward pass, taking the
    # cores from the job threads, Redis and producers on the same host; sleeping at once
    # costs the forward pass nothing measurable (docs/batching.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # jobs hand items to the batcher thread and back: hand the GIL over sooner than the
    # default 5 ms, or each hand-over can wait that long behind a busy thread
    sys.setswitchinterval(0.0005)
    url = _app.redis_url(redis_url)
    # a heartbeat stuck on a half-open connection would make this worker look dead
    try:
        registry = Registry(_app.redis_client(url, socket_timeout=HEARTBEAT_IO_S))
    except ValueError as e:
        print(f"pipeq worker: invalid Redis URL {masked(url)}: {e}", file=sys.stderr)
        return EXIT_FATAL
    # unique per start: a restarted container keeps its hostname and pid, and the jobs its
    # previous life held must not look like the new one's
    start_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    hostname = f"pipeq.{deployment.name}.{start_id}@{socket.gethostname()}"

    from functools import partial

    from pipeq.worker import placement
    from pipeq.worker.batcher import Batcher
    from pipeq.worker.generation import (
        ContinuousBatcher,
        ManagerSlot,
        Seq2SeqStreams,
        start_manager,
    )

    try:  # a wrong password, CA or URL is told in one line now, not after the model loads
        registry.redis.ping()
    except redis.RedisError as e:
        return _redis_failed(deployment.name, url, e)
    # a SIGTERM before Celery's own handler is in place (a scale-down or a deploy while
    # the model loads) is kept, then acted on: a clean stop, exit 0, not death by signal
    term_early = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: term_early.set())
    started = time.monotonic()
    group = None
    if deployment.tensor_parallel > 1:
        if gpu is not None:
            print(
                f"pipeq worker {deployment.name}: --gpu picks one GPU; tensor_parallel = "
                f"{deployment.tensor_parallel} runs rank r on cuda:r of CUDA_VISIBLE_DEVICES",
                file=sys.stderr,
            )
            return EXIT_FATAL
        from pipeq.worker import tensor_parallel

        # the followers start and join the process group; each loads its shard below
        group = tensor_parallel.launch(deployment, loglevel)
    try:
        # capped, loaded with its dtype and attention, compiled and warmed up
        handler = placement.load(deployment)
    except ModelLoadError as e:
        if group is not None:
            group.kill()
        print(f"pipeq worker {deployment.name}: {e.message}", file=sys.stderr, flush=True)
        try:
            registry.load_failed(deployment.name, deployment.to_dict(), e.message)
        except redis.RedisError:
            pass
        return EXIT_MODEL_LOAD_FAILED
    log.info("loaded %s in %.1f s", deployment.model, time.monotonic() - started)
    if group is not None:
        group.joined()
    if term_early.is_set():
        log.info("asked to stop while loading: stopping before taking a job")
        return 0

    events = Events()
    # what this worker holds is its own until a peer finds it silent and fences it; every
    # write that relies on it checks the fence (a frozen worker that comes back exits)
    lease = Lease(hostname)

    def on_malformed(raw: bytes, why: Malformed) -> None:
        if why.job_id is not None:
            error = InvalidRequest(f"malformed message: {why.reason}")
            app.backend.mark_as_failure(why.job_id, error)
            # Celery never saw it: Flower learns of the job, and of its failure, from here
            name = f"{_app.RUN_TASK}[{deployment.name}]"
            events.send("task-received", why.job_id, name=name, args="()", kwargs="")
            events.send("task-failed", why.job_id, exception=repr(error))

    def on_lost(job_ids: list[str]) -> None:
        for job_id in job_ids:
            events.send("task-failed", job_id, exception=repr(JobLost("its worker died")))

    held = HELD_BATCHES * deployment.max_batch_size
    threads = concurrency or held + HIGH_ROOM_BATCHES * deployment.max_batch_size
    high_room = max(0, min(threads - held, HIGH_ROOM_BATCHES * deployment.max_batch_size))
    app = _app.make_app(
        url,
        worker_consumer=f"{__name__}:Consumer",
        broker_transport=_app.transport_for(url, "pipeq.worker.transport"),
        broker_transport_options={
            "socket_connect_timeout": _app.CONNECT_TIMEOUT_S,
            "pipeq_inflight": inflight_key(hostname),
            "pipeq_max_message_bytes": _max_message_bytes(deployment),
            "pipeq_on_malformed": on_malformed,
            "pipeq_lease": lease,
            "pipeq_take_max": deployment.max_batch_size,
            "pipeq_high_room": high_room,
            # an idle worker's BLMOVE waits this long (s) for a job before it asks again
            # (kombu's brpop_timeout, 1 s by default)
            "polling_interval": IDLE_WAIT_S,
        },
        # a result waits for Redis (up to ~10 minutes) rather than being lost
        result_backend_always_retry=True,
        # the job threads share a few connections rather than each opening its own
        redis_max_connections=BACKEND_CONNECTIONS,
        result_backend_max_retries=60,
        pipeq_deployment=deployment.name,  # outcomes of jobs sent around the ledger count here
        pipeq_lease=lease,  # a result is stored only while this worker owns its job
    )
    Consumer.events = events
    observations = Observations()
    admission = Admission(
        app.backend.ledger,
        deployment.name,
        hostname,
        events,
        observe=observations.observe,
        lease=lease,
    )
    run: Callable[..., Any] = partial(handler.run, time_limit_s=deployment.job_timeout_s)
    slot = None
    if deployment.batching == "continuous":
        start: Callable[[], Any] = partial(
            start_manager,
            handler.pipe,
            deployment.max_batch_size,
            gpu_memory_cap_bytes=handler.gpu_memory_cap_bytes,
        )
        # restarted when its loop ends on an error: one request never stops the worker
        slot = ManagerSlot(start if group is None else group.manager(start))
        run = slot.paused(run)  # one forward pass on the model at a time
    if group is not None:  # every rank runs each batch (tensor_parallel.py)
        run = group.mirrored(run, slot.lock if slot is not None else None)
    batcher = Batcher(
        run,
        # pipeq's own pipelines (question-answering, summarization, translation) run the
        # items of a batch one at a time: a batch of them only held every result, and its
        # job_timeout_s clock, until the last was done (docs/batching.md, real size)
        max_batch_size=deployment.max_batch_size if handler.native else 1,
        max_batch_wait_ms=deployment.max_batch_wait_ms,
        admit=admission,
        settled=admission.settled,
        on_oom=_free_cuda_memory,
        size=handler.size,
        observe=observations.observe,
        # one thread calls the model: not with continuous batching or tensor parallelism
        stage=handler.stage if deployment.pipelining and slot is None and group is None else None,
    ).start()
    if deployment.canonical_task in ("summarization", "translation"):
        # their text streams a token at a time where generate() takes a streamer
        handler.streams = Seq2SeqStreams(
            app.backend.ledger, lease, hostname, lambda: batcher.forwarding
        )
    engine: Batcher | ContinuousBatcher = batcher
    if slot is not None:
        engine = ContinuousBatcher(
            handler.pipe,
            slot,
            batcher,
            app.backend.ledger.redis,
            admit=admission,
            lease=lease,
            hostname=hostname,
            time_limit_s=deployment.job_timeout_s,
            observe=observations.observe,
            count=observations.count,
        ).start()
    register_task(
        app,
        deployment,
        engine,
        admission,
        events,
        handler.check_input,
        handler.check_result,
        handler.usage,
    )
    info = {
        **handler.info(),
        **placement.loaded_info(handler),
        "heartbeat_s": liveness.heartbeat_s,
        "tensor_parallel": deployment.tensor_parallel,
        "dead_after_s": liveness.dead_after_s,
    }
    engine_stopped = threading.Event()  # by this function: not a failure to exit 70 for
    heartbeat = Heartbeat(
        registry.redis,
        deployment.name,
        hostname,
        info,
        liveness,
        stats=lambda: {**engine.stats.as_dict(), **_gpu_memory()},
        observations=observations,
        # a forward pass past twice the job timeout (generation stops at it) is hung:
        # stop beating for the jobs held, so that the other workers take them
        healthy=lambda: (
            engine_stopped.is_set()
            or (engine.alive and not engine.stuck(2 * deployment.job_timeout_s + 5))
        ),
        on_lost=on_lost,
        result_ttl_s=_app.RESULT_TTL_S,
        lease=lease,
    )
    try:
        heartbeat.start()  # owns its in-flight list before it takes a job
        registry.loaded(deployment.name)
    except redis.RedisError as e:
        return _redis_failed(deployment.name, url, e)
    stopping = threading.Event()

    @signals.worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def _going(**_: Any) -> None:
        # the jobs waiting for a batch go back to the front of the queue at once; the
        # batch running now finishes, and the heartbeat goes on until it has
        stopping.set()
        log.info("stopping: handed %d waiting item(s) back", engine.hand_back())

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: Any) -> None:
        if term_early.is_set():  # Celery's handler is in place now: a warm shutdown
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        status = app.start(
            [
                "worker",
                f"--queues={queue_for(deployment.name)}",
                "--pool=threads",
                f"--concurrency={threads}",
                f"--hostname={hostname}",
                "--without-gossip",
                "--without-mingle",
                # Flower's worker-heartbeat event (Celery's 2 s); Flower shows a worker
                # offline after two missed ones
                f"--heartbeat-interval={EVENT_HEARTBEAT_S}",
                f"--loglevel={loglevel}",
            ]
        )
    finally:
        engine_stopped.set()
        engine.stop()  # the continuous batcher stops its fallback too
        if group is not None:
            group.stop()
        heartbeat.stop()
    if isinstance(status, int) and status != 0:
        return status
    if not stopping.is_set():
        log.critical("the worker stopped without being asked to")
        return EXIT_FATAL
    return 0
