"""Continuous batching for text-generation, with every job's text streamed into Redis.

transformers 5's `ContinuousBatchingManager` (`model.init_continuous_batching()`) runs
one generation loop in a thread of its own: a request added with `add_request` joins
the running batch at the next decoding step and leaves it when it is done, each with its
own `max_new_tokens`; `cancel_request` takes it out before the next step. Its KV cache
is paged, so requests of different lengths share steps without padding.

`ContinuousBatcher` puts pipeq's jobs into it. A job goes there when the manager gives
exactly what `pipe(item, **params)` gives (`decoding.plan`, on what changes decoding):
greedy or sampled decoding of string prompts or chats, each row with its own logits
processors and random generator (`decoding.DrawStep`), stop strings (checked here, after
each token), several sequences (a request each). Any other job (beam search, `max_time`,
a `prefix`, ...) goes to the dynamic `Batcher`, decided per job; so does a suspect (a
job delivered again after its worker died), which the batcher runs alone. Which engine
runs a job, and why, goes in its stream's `start` entry and in the counter
`generation_jobs_total:<engine>`.

One driver thread (`pipeq-generation`) owns the manager's side: it admits new jobs (one
Redis round trip for all that arrived, `Admission` with `stoppable`), adds their
requests, reads the tokens the manager makes, and in one pipelined round trip a step
appends each job's new text to its Redis Stream (`pipeq:stream:<job id>`, capped at
`STREAM_MAXLEN` entries, expiring with the result) and reads which of its running jobs
were cancelled. A cancelled job's requests are cancelled at once, so they leave the batch
at the next step and their cache blocks go to the next request. A job's future is
completed only after its last piece is in Redis, so a stream never lacks what its
result holds.

transformers' loop does not survive an error in a step: it fails every request it holds
and stops (a BaseException, such as a Rust panic, ends it without failing them). The
driver notices (a request's failed output, or the loop gone), runs each request the
manager held again on the dynamic batcher (the reference pipeline: a request that fails
there fails alone, the others get the same text, greedy or seeded, their streams going
on where they were), and starts a new manager for the next jobs (`ManagerSlot`). Nothing
of that stops the worker; only a manager that cannot be started again leaves generation
to the dynamic batcher. A request the tokenizer cannot decode, or whose own processors
or draw fail, fails alone.

A stream's entries (`Job.stream` reads them):

    start  the worker's hostname: an attempt begins (a second one: the job restarted);
           with `engine` (continuous or dynamic), `reason` (why dynamic), `seed`
    i, t   item index and the next piece of its text (the prompt first, when the result
           holds it: `return_full_text`)
    end    the job's outcome, written by the task when it is done
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from pipeq import _app
from pipeq._ledger import Ledger
from pipeq.errors import JobCancelled, JobFailed, JobTimeout
from pipeq.worker.batcher import (
    Batcher,
    BatchStats,
    HandBack,
    Quarantine,
    Submission,
    _resolve,
    contained,
)
from pipeq.worker.liveness import Lease
from pipeq.worker.transport import retrying

if TYPE_CHECKING:  # torch and transformers load with the model, after the GPU is chosen
    from pipeq.worker.decoding import Decoding, JobPlan

__all__ = [
    "STREAM_MAXLEN",
    "ContinuousBatcher",
    "ManagerSlot",
    "Seq2SeqStreams",
    "TextPieces",
    "settled_text",
    "start_manager",
    "write_end",
]

log = logging.getLogger("pipeq.generation")
T = TypeVar("T")

#: the engine's reason for a job delivered again after its worker died
SUSPECT = "delivered again after its worker died: run alone"
#: how much longer than `job_timeout_s` a job's task waits for the driver to stop it
STOP_GRACE_S = 5.0
#: entries kept per stream (about one per generated token per item): a stream past it
#: loses its oldest pieces, a late reader then sees `StreamTruncated`
STREAM_MAXLEN = 100_000


def settled_text(text: str) -> str:
    """The part of a generation's text so far that later tokens cannot change. A token
    may end inside a multi-byte character: the incomplete tail decodes as one U+FFFD
    (the maximal subpart, as `tokenizers` and Python decode), which waits for the next
    token; earlier U+FFFDs are invalid bytes for good."""
    return text[:-1] if text.endswith("\ufffd") else text


def append(
    ledger: Ledger,
    lease: Lease,
    writes: list[tuple[str, dict[str, Any]]],
    jobs: Sequence[str] = (),
) -> list[int]:
    """Append entries to their jobs' streams, if this worker still owns its jobs (`_ledger`
    append: else `Lease.lost`), and read the cancel marks of `jobs`, in one round trip.
    Waits while Redis is unreachable or refuses writes."""
    entries = [
        json.dumps([job_id, *(str(x) for kv in fields.items() for x in kv)])
        for job_id, fields in writes
    ]
    args = [STREAM_MAXLEN, _app.RESULT_TTL_S, len(entries), *entries, *jobs]
    reply = retrying(ledger.script("append"), [lease.key], args)
    return list(lease.check(reply, "writing stream pieces"))


def write_end(ledger: Ledger, job_id: str, outcome: str, lease: Lease) -> None:
    """Append the `end` entry to a job's stream (the task does, whatever the outcome)."""
    append(ledger, lease, [(job_id, {"end": outcome})])


class TextPieces:
    """transformers' streamer interface (`put`, `end`) for one `generate()` call of one
    row, as pipeq's seq2seq handlers make it: each new token's settled text goes to
    `emit`, decoded as the result is (special tokens skipped), so the pieces make it."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None], **decode: Any) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.decode = decode
        self.tokens: list[int] = []
        self.emitted = ""
        self._first = True

    def put(self, value: Any) -> None:
        if self._first:  # the decoder's start token, which generate() puts first
            self._first = False
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._send(final=False)

    def end(self) -> None:
        self._send(final=True)

    def _send(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True, **self.decode)
        stable = text if final else settled_text(text)
        if stable.startswith(self.emitted) and len(stable) > len(self.emitted):
            self.emit(stable[len(self.emitted) :])
            self.emitted = stable


class Seq2SeqStreams:
    """Summarization's and translation's text into their jobs' streams, a token at a
    time (`Handler.streams`): `streamer(k, ...)` for value `k` of the batch the dynamic
    batcher runs now (`forwarding`). An item streams once per worker: run again (its
    batch failed, each item then runs alone) it gives its text at the end, which the
    reader completes from the result. One round trip a token."""

    #: items and jobs remembered (the oldest forgotten first)
    KEEP = 10_000

    def __init__(
        self,
        ledger: Ledger,
        lease: Lease,
        hostname: str,
        forwarding: Callable[[], list[tuple[str, int]]],
    ) -> None:
        self.ledger = ledger
        self.lease = lease
        self.hostname = hostname
        self.forwarding = forwarding
        self._streamed: dict[tuple[str, int], None] = {}
        self._started: dict[str, None] = {}

    def _remember(self, seen: dict[Any, None], key: Any) -> None:
        seen[key] = None
        if len(seen) > self.KEEP:
            del seen[next(iter(seen))]

    def streamer(self, k: int, tokenizer: Any, decode: dict[str, Any]) -> TextPieces | None:
        where = self.forwarding()
        if k >= len(where) or where[k] in self._streamed:
            return None
        job_id, index = where[k]
        self._remember(self._streamed, where[k])

        def emit(piece: str) -> None:
            writes: list[tuple[str, dict[str, Any]]] = []
            if job_id not in self._started:  # an attempt begins here
                self._remember(self._started, job_id)
                writes.append((job_id, {"start": self.hostname or "worker"}))
            writes.append((job_id, {"i": index, "t": piece}))
            try:
                append(self.ledger, self.lease, writes)
            except redis.RedisError:  # the reader completes it from the result
                log.warning("could not stream a piece of %s", job_id, exc_info=True)

        return TextPieces(tokenizer, emit, **decode)


@dataclass
class _Request:
    """One sequence of one item of a job in the manager; its future gets the item's
    record (`{"generated_text": ...}`)."""

    job: Submission
    index: int  # the item
    sequence: int  # which of its num_return_sequences
    item: Any  # the prompt: a string or a chat
    plan: JobPlan
    params: dict[str, Any]  # the job's
    decoding: Decoding
    future: Future[Any] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    emitted: str = ""  # the new text streamed so far
    tokens: int = 0
    checked: int = 0  # generated tokens the stop strings were checked against
    stop: Any = None  # transformers' StopStringCriteria of the job's stop_strings
    rerouted: bool = False  # handed to the dynamic batcher

    @property
    def rid(self) -> str:
        return f"{self.job.job_id}#{self.index}" + (f".{self.sequence}" if self.sequence else "")

    @property
    def prompt(self) -> str:
        """The prompt as text (a chat: its messages as JSON)."""
        return self.item if isinstance(self.item, str) else json.dumps(self.item)

    @property
    def streams(self) -> bool:
        """Only a job's first sequence of each item streams (`Job.stream(item=)`)."""
        return self.sequence == 0

    @property
    def input_ids(self) -> list[int]:
        return self.plan.input_ids[self.index]

    def head(self) -> str:
        """What the result's text holds before the new text: the prompt (a string prompt,
        `return_full_text`), or the assistant message being continued (a chat)."""
        if not self.plan.full_text:
            return ""
        if isinstance(self.item, str):
            return self.item
        return str(self.item[-1]["content"]) if self.plan.continue_final[self.index] else ""

    def record(self, text: str) -> dict[str, Any]:
        """The item's record for new text `text`, in the pipeline's shape."""
        if not self.plan.full_text:
            return {"generated_text": text}
        if isinstance(self.item, str):
            return {"generated_text": self.item + text}
        messages = [dict(m) for m in self.item]
        if self.plan.continue_final[self.index]:
            messages[-1]["content"] = messages[-1]["content"] + text
        else:
            messages.append({"role": "assistant", "content": text})
        return {"generated_text": messages}

    def single_params(self) -> dict[str, Any]:
        """The parameters that give this sequence alone (`pipe(item, **them)`): the job's,
        one sequence, its own seed."""
        from pipeq.worker.decoding import seed_of

        out = {k: v for k, v in self.params.items() if k != "num_return_sequences"}
        if self.plan.seed is not None:
            out["seed"] = seed_of(self.plan.seed, self.sequence)
        return out


def _gathered(futures: list[Future[Any]]) -> Future[Any]:
    """One item's future: the list of its sequences' records once all are done (the
    first error, if any failed). One sequence: its record in a list, as the pipeline."""
    out: Future[Any] = Future()

    def done(_: Future[Any]) -> None:
        if out.done() or not all(f.done() for f in futures):
            return
        for f in futures:
            if f.cancelled():
                _resolve(out, error=JobCancelled("the job was cancelled"))
                return
            if f.exception() is not None:
                _resolve(out, error=f.exception())
                return
        _resolve(out, [f.result() for f in futures])

    for f in futures:
        f.add_done_callback(done)

    def given_up(_: Future[Any]) -> None:  # the job's wait ended: its sequences too
        if out.cancelled():
            for f in futures:
                f.cancel()

    out.add_done_callback(given_up)
    return out


def start_manager(pipe: Any, max_batch_size: int, gpu_memory_cap_bytes: int | None = None) -> Any:
    """The model's `ContinuousBatchingManager`, greedy, with pipeq's per-request draw step
    (`decoding.install`: `manager.draw`), started. The model keeps (or is switched to) SDPA
    attention, which both the manager and `generate()` run. The manager runs synchronously
    and without CUDA graphs or compilation: the draw step runs Python per row between a
    batch's preparation and its argmax, which neither a captured graph nor an overlapped
    next batch would see.

    On a GPU the manager sizes its paged KV cache from free memory (transformers'
    default). On the CPU that probing takes about 14 s and claims most of the host's
    memory, so the cache holds `max_batch_size` requests of the model's full length
    (distilgpt2's shape: 8 x 1,024 tokens, 300 MB); more requests wait for blocks to free.
    On a GPU shared under `gpu_memory_cap_bytes`, the cache is sized inside the cap
    (`placement.cuda_cache_sizes`), not from the GPU's free memory."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from pipeq.worker.decoding import install

    model = pipe.model
    sizes: dict[str, Any] = {}
    if model.device.type == "cpu":
        page = ContinuousBatchingConfig().page_size
        length = getattr(model.config, "max_position_embeddings", None) or 1024
        sizes = {"num_blocks": max(8, -(-max_batch_size * length // page)), "max_batch_tokens": 512}
    elif gpu_memory_cap_bytes:
        from pipeq.worker.placement import cuda_cache_sizes

        page = ContinuousBatchingConfig().page_size
        sizes = cuda_cache_sizes(model, gpu_memory_cap_bytes, page)
    if model.config._attn_implementation not in ("sdpa",) and "flash" not in str(
        model.config._attn_implementation
    ):
        model.set_attn_implementation("sdpa")
    config = model.generation_config
    greedy = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    manager = model.init_continuous_batching(
        generation_config=greedy,
        continuous_batching_config=ContinuousBatchingConfig(
            max_queue_size=0, use_cuda_graph=False, use_async_batching=False, **sizes
        ),
    )
    manager.draw = install(manager)
    manager.start()
    return manager


class ManagerSlot:
    """The `ContinuousBatchingManager` running now, and a new one when its loop has ended
    (`restart`). A forward pass outside it (`paused`) and a restart hold one lock: one
    thing at a time runs the model."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start
        self._lock = threading.RLock()
        #: held by a forward pass outside the manager and by a restart (reentrant): a
        #: tensor-parallel rank 0 sends its followers a batch under it, before the pause
        self.lock = self._lock
        self.restarts = 0
        #: the manager running now; None once one could not be started again
        self.current: Any | None = start()

    def running(self) -> bool:
        """The manager's loop runs and takes requests: false from the moment an error in
        a step began to end it (before it fails its requests), or a BaseException did."""
        manager = self.current
        if manager is None or not manager.is_running():
            return False
        status = getattr(manager, "background_thread_status", None)
        return status is None or status.can_accept_new_requests() is None

    def paused(self, run: Callable[..., T]) -> Callable[..., T]:
        """`run`, called while the manager's loop is paused (its requests and cache kept),
        or alone while no loop runs: one forward pass on the model at a time."""

        def paused_run(*args: Any, **kwargs: Any) -> T:
            with self._lock, contextlib.ExitStack() as stack:
                manager = self.current
                if manager is not None and manager.is_running():
                    try:
                        stack.enter_context(manager.pause())
                    except RuntimeError:  # the loop ended before it could pause: none runs
                        log.warning("the continuous batching loop ended; running alone")
                return run(*args, **kwargs)

        return paused_run

    def restart(self) -> bool:
        """Stop the manager (its loop has ended) and start a new one; False when none
        could be started (generation then goes to the dynamic batcher)."""
        with self._lock:
            old, self.current = self.current, None
            if old is not None:
                try:
                    old.stop(block=True, timeout=10)
                except Exception:
                    log.exception("could not stop the continuous batching manager")
            try:
                self.current = self._start()
            except Exception:
                log.exception(
                    "could not start a new continuous batching manager: "
                    "generation goes to the dynamic batcher"
                )
                return False
            self.restarts += 1
            return True

    def stop(self) -> None:
        with self._lock:
            manager = self.current
            if manager is None:
                return
            try:
                manager.stop(block=True, timeout=10)
            except Exception:
                log.exception("could not stop the continuous batching manager")


class ContinuousBatcher:
    """Text-generation jobs through transformers' continuous batching; the rest (and
    suspects) through `fallback`. Same surface as `Batcher` for the worker."""

    def __init__(
        self,
        pipe: Any,
        slot: ManagerSlot,
        fallback: Batcher,
        client: redis.Redis,
        *,
        admit: Callable[..., dict[str, BaseException]],
        lease: Lease,
        hostname: str = "",
        time_limit_s: float | None = None,
        observe: Callable[[str, float], None] = lambda name, value: None,
        count: Callable[[str, str], None] = lambda name, label: None,
    ) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.slot = slot
        self.fallback = fallback
        self.ledger = Ledger(client)
        self.lease = lease
        self._admit = admit
        self.hostname = hostname
        self.time_limit_s = time_limit_s
        self._observe = observe
        self._count = count
        self._cond = threading.Condition()
        self._new: list[_Request] = []  # submitted, not admitted yet
        self._active: dict[str, _Request] = {}  # request id -> request, in the manager
        self._handing_back = False
        self._stopping = False
        self._last_output = time.monotonic()
        self.stats: BatchStats = fallback.stats  # one record of what batching did
        self._thread = threading.Thread(target=self._loop, name="pipeq-generation", daemon=True)

    @property
    def manager(self) -> Any:
        """transformers' manager running now (None: generation goes to the fallback)."""
        return self.slot.current

    # -- the worker's side ---------------------------------------------------------
    def start(self) -> ContinuousBatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self.slot.stop()
        self.fallback.stop()

    @property
    def alive(self) -> bool:
        """The driver and the fallback run (a manager whose loop ended is restarted)."""
        return self._thread.is_alive() and self.fallback.alive

    def stuck(self, limit_s: float) -> bool:
        """Requests run and no token came for `limit_s` (or the fallback's pass hangs)."""
        quiet = bool(self._active) and time.monotonic() - self._last_output > limit_s
        return quiet or self.fallback.stuck(limit_s)

    def hand_back(self) -> int:
        """Fail with HandBack the jobs not admitted yet (and any submitted later)."""
        with self._cond:
            self._handing_back = True
            back, self._new = self._new, []
        for r in back:
            _resolve(r.future, error=HandBack())
        return len(back) + self.fallback.hand_back()

    def plan(self, items: list[Any], params: dict[str, Any]) -> JobPlan | str:
        """How the manager serves this job exactly as `pipe(item, **params)` would
        (`decoding.plan`), or why it cannot (it goes to the dynamic batcher)."""
        from pipeq.worker.decoding import plan

        if self.manager is None:
            return "no continuous batching manager runs (it could not be restarted)"
        try:
            return plan(self.pipe, items, params)
        except Exception as e:  # the reference pipeline says what is wrong
            return f"could not plan it ({type(e).__name__})"

    def submit(
        self, job_id: str, items: list[Any], params: dict[str, Any], rank: int = 1
    ) -> Submission:
        """Queue a job's items; each future gets `pipe(item, **params)`'s result. Which
        engine runs the job goes in its stream's `start` entry (`engine`, and `reason`
        for the dynamic batcher) and in the deployment's `generation_jobs_total`. `rank`:
        its priority (`Batcher.submit`); the manager takes the requests that came since
        its last step most urgent first."""
        how = self.plan(items, params)
        if isinstance(how, str):
            self._count("generation_jobs_total", "dynamic")
            try:
                append(
                    self.ledger,
                    self.lease,
                    [
                        (
                            job_id,
                            {
                                "start": self.hostname or "worker",
                                "engine": "dynamic",
                                "reason": how,
                            },
                        )
                    ],
                )
            except Exception:  # a record only: the job runs anyway
                log.warning("could not record the engine of %s", job_id, exc_info=True)
            return self.fallback.submit(job_id, items, params, rank)
        # the driver stops a job at its time limit, after its last piece; the task's own
        # wait, a backstop, comes later so that its stream's `end` is the last entry
        job = Submission(job_id, [], grace_s=STOP_GRACE_S, rank=rank)
        requests: list[_Request] = []
        model = self.pipe.model
        stop = None
        if how.stop_strings:
            from transformers import StopStringCriteria

            stop = StopStringCriteria(self.tokenizer, how.stop_strings)
        for n, item in enumerate(items):
            sequences = [
                _Request(job, n, k, item, how, params, how.decoding(model, n, k), stop=stop)
                for k in range(how.sequences)
            ]
            requests.extend(sequences)
            job.futures.append(_gathered([r.future for r in sequences]))
        with self._cond:
            if self._handing_back:
                for r in requests:
                    _resolve(r.future, error=HandBack())
            else:
                self._new.extend(requests)
                self._cond.notify()
        return job

    # -- the driver thread -----------------------------------------------------------
    def _loop(self) -> None:
        writes: list[tuple[str, dict[str, Any]]] = []
        done: list[tuple[_Request, Any]] = []
        while True:
            with self._cond:
                while not self._new and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                new, self._new = self._new, []
                new.sort(key=lambda r: r.job.rank)  # stable: each level oldest first
            try:
                if not self.slot.running() and self.manager is not None:
                    self._restart()
                if new:
                    self._start(new, writes, done)
                self._read_outputs(writes, done)
                cancelled = self._flush(writes)
                writes = []
                for r, outcome in done:  # the pieces are in Redis: the result may go
                    _resolve(r.future, **outcome)
                done = []
                self._cancel(cancelled)
                if not self.slot.running() and self.manager is not None:
                    self._restart()  # at once, not when the next job comes
            except redis.RedisError as e:  # the pieces wait for the next round trip
                log.warning("could not write streams (%s); trying again", e)
                time.sleep(0.2)
            except BaseException as e:  # never let the thread die: rerun what it holds
                if not contained(e):
                    raise
                log.exception("continuous batching driver failed")
                for r, outcome in done:  # their outcome is known (a reader gets the result)
                    _resolve(r.future, **outcome)
                held = [*new, *self._active.values()]
                self._active.clear()
                writes, done = [], []
                for r in held:
                    if not r.future.done() and not r.rerouted:
                        self._cancel_request(r.rid)
                        self._to_fallback(r)

    def _restart(self) -> None:
        """The manager's loop has ended: the requests it held run again on the dynamic
        batcher, a new manager takes the next ones."""
        manager = self.manager
        status = getattr(manager, "background_thread_status", None)
        why = getattr(status, "fatal_error", None) or "its loop ended"
        held = list(self._active.values())
        self._active.clear()
        log.error(
            "the continuous batching manager stopped (%s): restarting it; %d request(s) "
            "run again on the dynamic batcher",
            why,
            len(held),
        )
        for r in held:
            self._to_fallback(r)
        self.slot.restart()

    def _cancel_request(self, rid: str) -> None:
        manager = self.manager
        if manager is not None:
            manager.cancel_request(rid)

    def _start(
        self,
        new: list[_Request],
        writes: list[tuple[str, dict[str, Any]]],
        done: list[tuple[_Request, Any]],
    ) -> None:
        jobs = sorted({r.job.job_id for r in new})
        if not self._active:  # the first step's time counts from now, not from idle
            self._last_output = time.monotonic()
        try:
            refused = self._admit(jobs, False, True)
        except Exception as e:
            log.exception("admit hook failed")
            refused = {j: e for j in jobs}
        started = time.monotonic()
        plans = {r.job.job_id: r.plan for r in new}
        for job_id in jobs:  # an attempt begins here (a suspect's too, in the batcher)
            start = {"start": self.hostname or "worker", "engine": "continuous"}
            if plans[job_id].seed is not None:
                start["seed"] = str(plans[job_id].seed)
            if isinstance(refused.get(job_id), Quarantine):
                start["engine"], start["reason"] = "dynamic", SUSPECT
            if job_id not in refused or isinstance(refused[job_id], Quarantine):
                writes.append((job_id, start))
                self._count("generation_jobs_total", start["engine"])
        for r in new:
            verdict = refused.get(r.job.job_id)
            if isinstance(verdict, Quarantine):  # a suspect: the batcher runs it alone
                self._to_fallback(r)
                continue
            if verdict is not None:
                done.append((r, {"error": verdict}))
                continue
            if not r.future.set_running_or_notify_cancel():
                continue  # its job gave up
            if r.job.started_at is None:
                r.job.started_at = started
            manager = self.manager
            if manager is None:  # none could be started again
                self._to_fallback(r)
                continue
            head = r.head()
            if head and r.streams:
                writes.append((r.job.job_id, {"i": r.index, "t": head}))
            self._active[r.rid] = r
            if not r.decoding.plain:
                manager.draw.rows[r.rid] = r.decoding
            manager.add_request(
                r.input_ids,
                request_id=r.rid,
                max_new_tokens=r.plan.max_new_tokens[r.index],
                streaming=True,
                eos_token_id=r.plan.eos_token_id,
            )

    def _to_fallback(self, r: _Request) -> None:
        """Run `r` on the dynamic batcher (its item, with the parameters of that sequence
        alone: the same seed, so the same text); its future gets the record."""
        r.rerouted = True
        self._forget(r.rid)
        sub = self.fallback.submit(r.job.job_id, [r.item], r.single_params(), r.job.rank)

        def copy(f: Future[Any]) -> None:
            if r.job.started_at is None:
                r.job.started_at = sub.started_at or time.monotonic()
            if f.exception() is not None:
                _resolve(r.future, error=f.exception())
            else:
                _resolve(r.future, f.result()[0])

        sub.futures[0].add_done_callback(copy)

    def _forget(self, rid: str) -> None:
        """The draw step drops a request that left the manager."""
        manager = self.manager
        draw = getattr(manager, "draw", None)
        if draw is not None:
            draw.rows.pop(rid, None)

    def _read_outputs(
        self, writes: list[tuple[str, dict[str, Any]]], done: list[tuple[_Request, Any]]
    ) -> None:
        """Take what the manager made (waiting up to 50 ms for the first), as pieces."""
        manager = self.manager
        if manager is None:
            return
        router = manager.output_router
        outputs = []
        try:
            outputs.append(router.output_queue.get(timeout=0.05))
            while True:
                outputs.append(router.output_queue.get_nowait())
        except Exception:  # queue.Empty
            pass
        if not outputs:
            return
        now = time.monotonic()
        step_s, self._last_output = now - self._last_output, now
        stepped = set()
        for out in outputs:
            r = self._active.get(out.request_id)
            if r is None:  # cancelled meanwhile
                continue
            stepped.add(r.rid)
            if out.error is not None:  # the manager failed it: the reference runs it again
                del self._active[r.rid]
                log.warning("continuous batching failed %s (%s): rerunning it", r.rid, out.error)
                self._to_fallback(r)
                continue
            tokens = list(out.generated_tokens)
            finished = out.is_finished()
            if r.decoding.error is not None:  # its own processors or draw failed: it alone
                error = JobFailed(
                    f"decoding failed: {type(r.decoding.error).__name__}: {r.decoding.error}"
                )
                self._end(r)
                done.append((r, {"error": error}))
                continue
            if r.stop is not None:
                stopped = self._stopped_at(r, tokens)
                if stopped is not None:
                    tokens, finished = tokens[:stopped], True
            try:
                text = self.tokenizer.decode(tokens, **r.plan.decode_kwargs)
            except BaseException as e:  # a panic in the tokenizer: this request alone fails
                if not contained(e):
                    raise
                self._end(r)
                error = JobFailed(f"could not decode the tokens: {type(e).__name__}: {e}")
                done.append((r, {"error": error}))
                continue
            r.tokens = len(tokens)
            stable = text if finished else settled_text(text)
            if not r.streams:
                pass
            elif stable.startswith(r.emitted) and len(stable) > len(r.emitted):
                writes.append((r.job.job_id, {"i": r.index, "t": stable[len(r.emitted) :]}))
                r.emitted = stable
            elif finished and text != r.emitted:
                log.warning("the streamed text of %s differs from its final text", r.rid)
            if finished:
                self._end(r)
                done.append((r, {"result": r.record(text)}))
        if stepped:  # about one decoding step (more when the driver fell behind)
            self.stats.record(len(stepped), [0.0] * len(stepped), step_s)
            self._observe("batch_size", len(stepped))
            self._observe("forward_seconds", step_s)

    def _stopped_at(self, r: _Request, tokens: list[int]) -> int | None:
        """The number of generated tokens after which one of the job's stop strings
        ended (transformers' StopStringCriteria, checked after each token as generate()
        does), or None."""
        import torch

        for n in range(max(1, r.checked + 1), len(tokens) + 1):
            ids = torch.tensor([r.input_ids + tokens[:n]], dtype=torch.long)
            if bool(r.stop(ids, None)[0]):
                return n
        r.checked = len(tokens)
        return None

    def _end(self, r: _Request) -> None:
        """`r` leaves the batch (finished, stopped or failed): out of the manager, whose
        own end of it may come later, and of the draw step."""
        self._active.pop(r.rid, None)
        self._cancel_request(r.rid)
        self._forget(r.rid)

    def _flush(self, writes: list[tuple[str, dict[Any, Any]]]) -> set[str]:
        """Append the pieces to their streams and read which running jobs were
        cancelled, in one round trip. Returns the cancelled job ids."""
        jobs = sorted({r.job.job_id for r in self._active.values()})
        if not writes and not jobs:
            return set()
        marks = append(self.ledger, self.lease, writes, jobs)
        return {j for j, mark in zip(jobs, marks, strict=True) if mark}

    def _cancel(self, cancelled: set[str]) -> None:
        """Take out of the batch the requests of cancelled jobs and of jobs past
        `time_limit_s` from their first step; the manager frees their slots before its
        next step."""
        now = time.monotonic()
        limit = self.time_limit_s
        for rid, r in list(self._active.items()):
            late = limit is not None and now - (r.job.started_at or now) > limit
            if r.job.job_id in cancelled:
                error: BaseException = JobCancelled("the job was cancelled")
            elif late:
                error = JobTimeout(
                    f"generation stopped at job_timeout_s={limit} of its forward pass"
                )
            else:
                continue
            self._cancel_request(rid)
            del self._active[rid]
            _resolve(r.future, error=error)
