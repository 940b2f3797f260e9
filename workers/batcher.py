"""Dynamic batching: one thread owns the model and runs waiting items together.

Celery's threads pool runs each job in its own thread; the job hands its items to the
batcher and waits on their futures. The batcher thread is the only one that touches
the model. It forms a batch when `max_batch_size` items with the same parameters are
waiting, or when the oldest item has waited `max_batch_wait_ms`, whichever is first.
Jobs that arrive while a batch runs are waiting for the next one, so under load the
batches fill without any waiting at all.

Batches take the waiting items in order of input length, sweeping up from where the
last batch ended and wrapping round (an elevator's sweep), so a batch holds inputs of
near-equal length and padding stays small, while no item waits longer than one sweep
of the waiting pool. Items with different parameters never share a forward pass; the
oldest waiting item's parameters go first. A job's priority (`PRIORITIES`: 0 high, 1
normal, 2 low) comes before all that: the oldest item of the most urgent level present
leads, and a batch takes its peers level by level, sweeping within the last level it
reaches (so a high job waits for the batch running now, not for the normal or low items
held before it). When a batch raises, its items are
run one by one so a bad item fails alone; a CUDA out-of-memory error halves the batch.
Before each forward pass the `admit(job_ids, alone)` hook says which jobs must not run
(and why: cancelled, expired, finished already) and which must run apart from the rest
(`Quarantine`: delivered again after their worker died, so a suspect); the worker does
that in one Redis round trip a batch, marking the others as running. A quarantined job
goes back to the front of the waiting items and forms a batch of its own items only,
once the jobs already begun have run their remaining items and `settled(job_id)` says
no other job is between its forward pass and its stored result (were the suspect to
kill the worker, such a job would count an attempt it did not cause).

With `stage` (pipelining, docs/batching.md), a batch runs in three steps on three
threads: while the batcher thread runs one batch's forward pass (`Staged.forward`), the
`_ahead` lane forms the next batch if a full one waits and tokenizes it (`stage`), and
the `_behind` lane post-processes the last one (`Staged.finish`). A batch formed ahead
is admitted only when its turn comes, and goes back to the waiting items if a more
urgent one came meanwhile. A failed forward or post-processing runs the batch again
through `run`.

`hand_back()` (the worker is stopping) fails every waiting item of a job that has not
started with `HandBack`, so its message goes back to the queue at once; the jobs begun
(the batch running now, the rest of a long list) finish.

The batcher thread never dies of an error, whatever its class: pipeline and tokenizer
code can raise BaseExceptions that are not Exceptions (a Rust panic in `tokenizers` is
`pyo3_runtime.PanicException`), and those fail their item like any error (`contained`).
Only the shutdown signals (SystemExit, KeyboardInterrupt) pass. A job that gave up (its
futures cancelled) is skipped, and anything unexpected fails the batch it happened in.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pipeq.batcher")

__all__ = [
    "BatchError",
    "BatchStats",
    "Batcher",
    "HandBack",
    "Quarantine",
    "Submission",
    "contained",
    "length_in_chars",
]


class HandBack(Exception):
    """The worker is stopping: this job has not started, and goes back to its queue."""


class Quarantine(Exception):
    """Admission's verdict on a suspect: run this job in a batch of its own items only."""


@dataclass
class Submission:
    """A job's items in the batcher: one future per item, and when its forward began."""

    job_id: str
    futures: list[Future[Any]]
    #: time.monotonic() when the job's first forward pass began (admitted), else None
    started_at: float | None = None
    #: the job's task waits this much past its time limit: the engine enforces the limit
    #: itself and completes the futures (continuous batching), the wait is a backstop
    grace_s: float = 0.0
    #: the job's priority: 0 (high), 1 (normal) or 2 (low)
    rank: int = 1


@dataclass
class _Item:
    job: Submission
    value: Any
    params: dict[str, Any]
    key: str
    size: int = -1  # measured only when more items wait than one batch takes
    arrived: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)
    alone: bool = False  # quarantined: shares a forward pass with its own job's items only

    @property
    def rank(self) -> int:
        return self.job.rank

    @property
    def job_id(self) -> str:
        return self.job.job_id


@dataclass
class BatchStats:
    """What batching did: batch sizes formed and the time items waited for a batch."""

    batches: int = 0
    items: int = 0
    sizes: dict[int, int] = field(default_factory=dict)
    waited_s: float = 0.0
    max_waited_s: float = 0.0
    forward_s: float = 0.0

    def record(self, size: int, waits: list[float], forward_s: float) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.waited_s += sum(waits)
        self.max_waited_s = max(self.max_waited_s, *waits)
        self.forward_s += forward_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "mean_batch_size": self.items / self.batches if self.batches else 0.0,
            "mean_wait_ms": 1000 * self.waited_s / self.items if self.items else 0.0,
            "max_wait_ms": 1000 * self.max_waited_s,
            "forward_s": self.forward_s,
        }


def length_in_chars(value: Any) -> int:
    """How the batcher measures an item unless told otherwise (`Batcher(size=...)`)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(v)) for v in value.values())
    return len(json.dumps(value))


class BatchError(Exception):
    """Raised by `run` for the batch as a whole: every item gets it, none is run again."""


def _resolve(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Complete a future, unless its job gave up on it already (cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def contained(e: BaseException) -> bool:
    """An error that fails the item (or batch) it happened in and nothing more: every
    BaseException but the process's own shutdown signals (SystemExit, KeyboardInterrupt)."""
    return not isinstance(e, SystemExit | KeyboardInterrupt)


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError


class _Lane:
    """One daemon thread that runs the calls submitted to it, in order, until closed."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[
            tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        #: time.monotonic() when the call running now began; None between calls
        self.busy_since: float | None = None
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        self._calls.put((done, fn, args))
        return done

    def close(self) -> None:
        """The thread ends once the calls submitted before are done."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            done, fn, args = call
            self.busy_since = time.monotonic()
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, which decides
                done.set_exception(e)
            finally:
                self.busy_since = None
            del call, done, fn, args  # not the last batch's items held until the next call


class Batcher:
    """Feeds `run(items, params) -> results` with batches of waiting items."""

    def __init__(
        self,
        run: Callable[[list[Any], dict[str, Any]], list[Any]],
        *,
        max_batch_size: int,
        max_batch_wait_ms: float,
        admit: Callable[[list[str], bool], dict[str, BaseException]] = lambda ids, alone: {},
        settled: Callable[[str], bool] = lambda job_id: True,
        on_oom: Callable[[], None] = lambda: None,
        size: Callable[[Any], int] = length_in_chars,
        observe: Callable[[str, float], None] = lambda name, value: None,
        stage: Callable[[list[Any], dict[str, Any]], Any] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max(0.0, max_batch_wait_ms) / 1000
        self._admit = admit
        self._settled = settled
        self._on_oom = on_oom
        self._size = size
        self._observe = observe
        self._stage = stage
        #: pipelining (`stage`): the next batch is formed and tokenized on one lane while
        #: the model runs, and the last one post-processed on the other
        self._ahead = _Lane("pipeq-batcher-ahead") if stage is not None else None
        self._behind = _Lane("pipeq-batcher-behind") if stage is not None else None
        self._redo: list[list[_Item]] = []  # batches whose post-processing failed
        self._pending: list[_Item] = []
        self._sweep_at = -1  # input size the last batch ended at
        self._cond = threading.Condition()
        self._stopping = False
        self._handing_back = False
        self.stats = BatchStats()
        #: time.monotonic() when the forward pass running now began; None between passes
        self.forward_since: float | None = None
        self.forwarding: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._loop, name="pipeq-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        for lane in (self._ahead, self._behind):
            if lane is not None:
                lane.close()

    def submit(
        self, job_id: str, items: list[Any], params: dict[str, Any], rank: int = 1
    ) -> Submission:
        """Queue a job's items; each future gets that item's result or error. `rank`: the
        job's priority, 0 (high), 1 (normal) or 2 (low)."""
        key = json.dumps(params, sort_keys=True)
        job = Submission(job_id, [], rank=rank)
        new = [_Item(job, v, params, key) for v in items]
        job.futures = [i.future for i in new]
        with self._cond:
            if self._handing_back:
                for item in new:
                    _resolve(item.future, error=HandBack())
            else:
                self._pending.extend(new)
                self._cond.notify()
        return job

    def hand_back(self) -> int:
        """Fail with HandBack every waiting item of a job that has not started, and any
        submitted later; the jobs begun go on. Returns the number of items handed back."""
        with self._cond:
            self._handing_back = True
            back = [i for i in self._pending if i.job.started_at is None]
            self._pending = [i for i in self._pending if i.job.started_at is not None]
        for item in back:
            _resolve(item.future, error=HandBack())
        return len(back)

    def stuck(self, limit_s: float) -> bool:
        """A forward pass has run longer than `limit_s`: hung (a driver, a deadlock). With
        pipelining, so has a batch's tokenizing or post-processing (its own thread)."""
        now = time.monotonic()
        lanes = [lane.busy_since for lane in (self._ahead, self._behind) if lane is not None]
        return any(t is not None and now - t > limit_s for t in [self.forward_since, *lanes])

    @property
    def alive(self) -> bool:
        """The batcher thread runs (the worker is useless without it)."""
        return self._thread.is_alive()

    # -- the batcher thread --------------------------------------------------------
    def _loop(self) -> None:
        ahead: tuple[list[_Item], Any] | None = None  # formed and staged while the model ran
        drained = False  # stopping: the post-processing lane has no call left
        while True:
            batch, staged = None, None
            try:
                if ahead is not None:
                    batch, staged = self._prepared(ahead)
                if batch is None:
                    batch = self._next_batch()
            except BaseException as e:  # a fault in forming a batch: fail what waits, go on
                if not contained(e):
                    raise
                log.exception("forming a batch failed")
                with self._cond:
                    failed, self._pending = self._pending, []
                for item in failed + (ahead[0] if ahead is not None else []):
                    _resolve(item.future, error=e)
                ahead = None
                continue
            ahead = None
            if batch is None:  # stopping: once post-processing is done, what it sent back
                if self._behind is not None and not drained:  # runs (`_next_batch`'s redo)
                    self._behind.submit(lambda: None).result()
                    drained = True
                    continue
                return
            try:
                ahead = self._execute(batch, staged)
            except BaseException as e:  # never let the thread die: fail this batch instead
                if not contained(e):
                    raise
                log.exception("batch failed unexpectedly")
                for item in batch:
                    _resolve(item.future, error=e)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stopping and not self._redo:
                    self._cond.wait()
                if self._redo:  # begun: run again by `run` (before stopping too)
                    return self._redo.pop(0)
                if self._stopping:
                    return None
                suspect = next((i for i in self._pending if i.alone), None)
                if suspect is not None:
                    # first the rest of the jobs already begun, then the suspect alone
                    begun = [
                        i
                        for i in self._pending
                        if i.job.started_at is not None and i.job is not suspect.job
                    ]
                    if begun:
                        batch = self._sweep([i for i in begun if i.key == begun[0].key])
                        break
                    if self._settled(suspect.job_id):
                        batch = [i for i in self._pending if i.job is suspect.job]
                        batch = batch[: self.max_batch_size]
                        break
                    self._cond.wait(0.02)  # earlier jobs' results are being stored
                    continue
                oldest, peers = self._leading_peers()
                wait = oldest.arrived + self.max_batch_wait_s - time.monotonic()
                if len(peers) >= self.max_batch_size or wait <= 0:
                    batch = self._by_level(peers)
                    break
                self._cond.wait(wait)
            self._take(batch)
        return batch

    def _leading_peers(self) -> tuple[_Item, list[_Item]]:
        """The oldest item of the most urgent level, and the waiting items that share its
        parameters, in waiting order (under `_cond`)."""
        oldest = min(self._pending, key=lambda i: i.rank)  # the first of its level
        return oldest, [i for i in self._pending if i.key == oldest.key]

    def _take(self, batch: list[_Item]) -> None:
        """`batch` out of the waiting items (under `_cond`)."""
        chosen = {id(i) for i in batch}
        self._pending = [i for i in self._pending if id(i) not in chosen]

    def _by_level(self, peers: list[_Item]) -> list[_Item]:
        """`max_batch_size` of `peers`, most urgent level first; the last level reached
        is swept (`_sweep`)."""
        batch: list[_Item] = []
        for rank in sorted({i.rank for i in peers}):
            level = [i for i in peers if i.rank == rank]
            room = self.max_batch_size - len(batch)
            if len(level) > room:
                return batch + (self._sweep(level, room) if room else [])
            batch += level
        self._sweep_at = -1  # all of them fit
        return batch

    def _sweep(self, peers: list[_Item], room: int | None = None) -> list[_Item]:
        """The next `room` (default `max_batch_size`) items up the length axis from the
        last batch, wrapping round to the shortest at the top (an elevator's sweep):
        batches of near-equal lengths, and no item waits more than one sweep of the
        waiting pool. Items are measured only when there is a choice: a single job never
        pays for it."""
        room = self.max_batch_size if room is None else room
        if len(peers) <= room:
            self._sweep_at = -1
            return peers
        for item in peers:
            if item.size < 0:
                item.size = self._measure(item.value)
        peers.sort(key=lambda i: i.size)
        start = next((n for n, i in enumerate(peers) if i.size > self._sweep_at), 0)
        start = max(0, min(start, len(peers) - room))
        batch = peers[start : start + room]
        self._sweep_at = batch[-1].size if start + len(batch) < len(peers) else -1
        return batch

    def _measure(self, value: Any) -> int:
        try:
            return self._size(value)
        except BaseException as e:  # a grouping hint only: the forward pass reports it
            if not contained(e):
                raise
            log.exception("could not measure an input; grouping it as size 0")
            return 0

    def _execute(self, batch: list[_Item], staged: Any = None) -> tuple[list[_Item], Any] | None:
        """Admit and run `batch`; with pipelining, the next batch formed and staged while
        this one's forward pass ran (`_ahead`), else None."""
        if batch and all(i.future.running() for i in batch):  # a redo: admitted, begun
            self._forward(batch)
            return None
        now = time.monotonic()
        jobs = {i.job_id for i in batch}
        try:
            refused = self._admit(sorted(jobs), len(jobs) == 1)
        except Exception as e:  # the hook waits out Redis faults; anything else fails them
            log.exception("admit hook failed")
            refused = {i.job_id: e for i in batch}
        live, suspects = [], []
        for item in batch:
            verdict = refused.get(item.job_id)
            if isinstance(verdict, Quarantine):
                item.alone = True
                suspects.append(item)
            elif verdict is not None:
                _resolve(item.future, error=verdict)
            elif item.future.set_running_or_notify_cancel():  # else its job gave up
                live.append(item)
        if suspects:
            with self._cond:
                if self._handing_back:  # not started: back to the queue
                    for item in suspects:
                        _resolve(item.future, error=HandBack())
                else:
                    self._pending[:0] = suspects
        if not live:
            return None
        if self._stage is not None and (staged is None or len(live) < len(batch)):
            staged = self._staged(live)  # not staged ahead, or staged with jobs refused now
        started = time.monotonic()
        for item in live:
            if item.job.started_at is None:
                item.job.started_at = started
        self.forward_since = started
        ahead = None
        try:
            if staged is None:
                self._forward(live)
            else:
                ahead = self._pipelined(live, staged)
        finally:
            self.forward_since = None
        forward_s = time.monotonic() - started
        try:
            ahead = ahead.result() if ahead is not None else None
        except Exception:  # nothing was taken from the waiting items: they form the next
            log.exception("forming the next batch ahead failed")
            ahead = None
        self.stats.record(len(live), [now - i.arrived for i in live], forward_s)
        self._observe("batch_size", len(live))
        self._observe("forward_seconds", forward_s)
        log.debug("batch of %d ran in %.1f ms", len(live), 1000 * forward_s)
        return ahead

    # -- pipelining (`stage`) ------------------------------------------------------
    def _pipelined(self, items: list[_Item], staged: Any) -> Future[Any]:
        """`staged`'s forward pass on this thread while the next full batch is formed and
        staged on `_ahead`; its post-processing goes to `_behind`. Returns `_ahead`'s
        future. A failed forward runs the items again through `run` (which halves a batch
        out of memory and singles out a bad item) once `_ahead` is done with the
        tokenizer."""
        assert self._ahead is not None and self._behind is not None
        self.forwarding = [(i.job_id, i.job.futures.index(i.future)) for i in items]
        ahead = self._ahead.submit(self._form_ahead)
        try:
            staged.forward()
        except BaseException as e:
            if not contained(e):
                raise
            ahead.exception()  # waits: `run` tokenizes with the pipeline's tokenizer
            self._forward(items)
            return ahead
        self._behind.submit(self._finish, items, staged)
        return ahead

    def _staged(self, items: list[_Item]) -> Any:
        """`stage` of the items (tokenized and padded), None where it does not apply or
        fails (then `run` runs them, and reports the error)."""
        assert self._stage is not None
        try:
            return self._stage([i.value for i in items], items[0].params)
        except BaseException as e:
            if not contained(e):
                raise
            log.debug("staging a batch failed (%s); it runs unstaged", e)
            return None

    def _form_ahead(self) -> tuple[list[_Item], Any] | None:
        """On `_ahead`, while the model runs: the next batch, if a full one waits (a
        partial one would be smaller than the one formed after the forward pass), and
        its staging. Not admitted: a cancel or a deadline is judged when it runs."""
        with self._cond:
            if self._stopping or self._handing_back or self._redo or not self._pending:
                return None
            if any(i.alone for i in self._pending):
                return None
            _, peers = self._leading_peers()
            if len(peers) < self.max_batch_size:
                return None
            batch = self._by_level(peers)
            self._take(batch)
        return batch, self._staged(batch)

    def _prepared(self, ahead: tuple[list[_Item], Any]) -> tuple[list[_Item] | None, Any]:
        """The batch formed ahead, unless a more urgent item came meanwhile (then its
        items go back and the next batch is formed anew: a high job waits for no batch
        formed before it came). Items of jobs not begun are handed back if the worker
        is stopping."""
        batch, staged = ahead
        back = []
        with self._cond:
            if self._handing_back:
                back = [i for i in batch if i.job.started_at is None]
                batch = [i for i in batch if i.job.started_at is not None]
            worst = max((i.rank for i in batch), default=0)
            if batch and any(i.rank < worst or i.alone for i in self._pending):
                self._pending[:0] = batch
                batch = []
        for item in back:
            _resolve(item.future, error=HandBack())
        if not batch or back:  # formed anew, or staged with items handed back
            staged = None
        return batch or None, staged

    def _finish(self, items: list[_Item], staged: Any) -> None:
        """On `_behind`: the batch's results; if post-processing fails, the batch goes
        back to the batcher thread, which runs it again through `run` (a bad item fails
        alone)."""
        try:
            results = staged.finish()
        except BaseException as e:
            if not contained(e):
                raise
            log.debug("post-processing a batch failed (%s); it runs again unstaged", e)
            with self._cond:
                self._redo.append(items)
                self._cond.notify()
            return
        for item, result in zip(items, results, strict=True):
            _resolve(item.future, result)

    def _forward(self, items: list[_Item]) -> None:
        #: (job id, item index in its job) of each value `run` is called with now
        self.forwarding = [(i.job_id, i.job.futures.index(i.future)) for i in items]
        try:
            results = self._run([i.value for i in items], items[0].params)
        except BatchError as e:  # about the whole batch (a time limit): no item to single out
            for item in items:
                _resolve(item.future, error=e)
            return
        except BaseException as e:  # a Rust panic too: its item fails, the rest run
            if not contained(e):
                raise
            oom = _is_oom(e)
            if oom:
                self._on_oom()
            if len(items) == 1:
                _resolve(items[0].future, error=e)
                return
            half = len(items) // 2
            # out of memory: halve the batch; anything else: each item alone finds the bad one
            for part in [items[:half], items[half:]] if oom else [[i] for i in items]:
                self._forward(part)
            return
        for item, result in zip(items, results, strict=True):
            _resolve(item.future, result)
