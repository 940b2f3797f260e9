"""How a worker takes messages: into an in-flight list of its own, never into thin air.

kombu's Redis transport takes a message with BRPOP, then records it in its `unacked`
hash in a second command; a worker killed between the two loses the message (seen: 1 in
2,950 jobs over a kill-and-restart soak). It gives the unacknowledged messages of a dead
worker back only after a visibility timeout (an hour by default), and those of a live
worker whose job outlasts the timeout as well, so long jobs ran several times.

A pipeq worker instead moves each message with BLMOVE from its deployment's queue to
`pipeq:inflight:<worker>` (one atomic step; then up to a batch's worth more in one script,
`take`), acknowledges by removing it from there (the acknowledged ones together, before the
next take or every `ACK_FLUSH_S`), and hands it back by moving it to the front of the
queue. Its heartbeat owns that list: the
other workers of the deployment put the messages back only once the heartbeat stopped
(`_ledger` beat), however long a job runs. Each message passes the gate (`gate`) before
kombu sees it; one that fails is set aside in the dead-letter list.

Acknowledging, handing back and setting aside each check the worker's fence in the same
script (`liveness.Lease`): a worker whose jobs were put back while it was frozen never
removes a message it no longer owns. A Redis refusing writes (full, read-only, MISCONF)
is waited out: taking the next message and every write here try again with backoff.

Narrow overrides of kombu's own Channel and QoS, for the worker's one task queue only;
every other use (Celery's control replies, events) goes through kombu unchanged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from functools import cached_property
from queue import Empty  # what kombu's channels raise for "no message"
from typing import Any, ClassVar, TypeVar

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.backoff import ExponentialBackoff

from pipeq._app import _Channel
from pipeq._ledger import DEAD_LETTER, DEAD_LETTER_KEEP, DOORBELL, level_queue
from pipeq._redis import write_refusal
from pipeq.worker.gate import Malformed, check_message
from pipeq.worker.liveness import Lease

__all__ = ["RETRY_FOR_S", "Transport", "retrying"]

log = logging.getLogger("pipeq.worker")
T = TypeVar("T")

#: an acknowledgement or hand-back waits this long for Redis to come back
RETRY_FOR_S = 300.0
#: acknowledgements held at most before they are flushed whatever the consumer does
ACKS_MAX = 256
#: and for at most this long (seconds): the event loop's timer flushes them
ACK_FLUSH_S = 0.25
#: a worker that holds its share of normal and low jobs waits this long (s) at a time for
#: a high one (BLMOVE on the high list), then looks again at what it may take: short, so
#: that room made by a batch that ended is filled before the batches it holds run out
HIGH_ONLY_WAIT_S = 0.05


#: in-flight lists in which a message may sit undelivered: a step that takes (BLMOVE,
#: `take`) lost its connection before its reply came, or a channel closed while its BLMOVE
#: waited. The consumer's next take puts such messages back first (`_ledger` orphans).
_ORPHANS_POSSIBLE: set[str | None] = set()

#: acknowledged messages not yet out of their in-flight list, by list (`_acks`)
_PENDING_ACKS: dict[str | None, list[bytes]] = {}
_PENDING_LOCK = threading.Lock()

#: how long to wait before trying a refused or failed Redis call again (redis-py's)
BACKOFF = ExponentialBackoff(cap=1.0, base=0.05)


def retrying(fn: Callable[..., T], *args: Any, retry_for_s: float = RETRY_FOR_S) -> T:
    """`fn(*args)`, tried again while Redis is unreachable (up to `retry_for_s`) or
    refuses writes (full, read-only, not persisting: for as long as it does, since
    nothing this worker could do instead would be stored either), backing off up to 1 s."""
    deadline = time.monotonic() + retry_for_s
    failures = 0
    while True:
        try:
            return fn(*args)
        except redis.RedisError as e:
            refusal = write_refusal(e)
            unreachable = isinstance(e, (redis.ConnectionError, redis.TimeoutError))
            if refusal is None and not (unreachable and time.monotonic() < deadline):
                raise
            if refusal is not None and failures % 60 == 0:
                log.warning("Redis refuses writes (%s): waiting for it", refusal)
            failures += 1
            time.sleep(BACKOFF.compute(failures))


class InflightQoS(kombu_redis.QoS):
    """Acknowledge and reject the messages of a worker's in-flight list; kombu's own
    bookkeeping for any other."""

    # a channel closed while job threads still hold its messages (a reconnect, shutdown)
    # leaves them to those threads: kombu would push them back to the queue meanwhile
    restore_at_shutdown = False

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.held:
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        held = self.channel.held.pop(delivery_tag, None)
        if held is None:
            return super().ack(delivery_tag)  # type: ignore[no-any-return]
        self.channel.defer_ack(held[0])
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        held = self.channel.held.pop(delivery_tag, None)
        if held is None:
            return super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-any-return]
        raw, queue, job_id = held
        if requeue:
            self.channel.requeue(raw, queue)
        else:  # Celery gave up on it (a message it cannot parse): set aside, never dropped
            why = Malformed("the worker's Celery consumer rejected it", job_id)
            self.channel.set_aside(raw, queue, why)
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """kombu's visibility-timeout sweep: replaced by the ledger's heartbeat reclaim."""


class WorkerChannel(_Channel):
    """Takes messages with BLMOVE into `pipeq_inflight` when it consumes one queue."""

    QoS = InflightQoS
    #: the worker's in-flight list (`_ledger.inflight_key(worker)`)
    pipeq_inflight: str | None = None
    #: messages larger than this are set aside unread
    pipeq_max_message_bytes: int = 64 * 2**20
    #: called with (raw message, Malformed) before a message is set aside
    pipeq_on_malformed: Callable[[bytes, Malformed], None] | None = None
    #: the worker's claim on its in-flight list (its fence), with `pipeq_inflight`
    pipeq_lease: Lease | None = None
    #: messages taken in one step at most (the deployment's max_batch_size)
    pipeq_take_max: int = 1
    #: room kept for high jobs: with no more room than this, the worker takes high ones only
    pipeq_high_room: int = 0
    from_transport_options = (  # type: ignore[assignment]
        *_Channel.from_transport_options,
        "pipeq_inflight",
        "pipeq_max_message_bytes",
        "pipeq_on_malformed",
        "pipeq_lease",
        "pipeq_take_max",
        "pipeq_high_room",
    )
    _blmove_queue: str | None = None
    #: this process's channels (a reconnection makes a new one while job threads still hold
    #: the old one's messages): together they hold what its in-flight list should
    _channels: ClassVar[weakref.WeakSet[WorkerChannel]] = weakref.WeakSet()
    #: where the BLMOVE waiting now takes from: "main" (the queue) or "high" (its high list)
    _blmove_from = "main"
    #: consecutive refused takes (Redis refusing writes), for the backoff
    _refused = 0

    @cached_property
    def _commands_client(self) -> Any:
        """One client for the commands of every channel of this connection (the task
        consumer's and the control channel's): each channel's own made a connection each
        to Redis for a few commands. The first channel's pool serves them; a pool closed
        with its channel reconnects on its next command."""
        shared = getattr(self.connection, "_pipeq_commands_client", None)
        if shared is None:
            shared = self.connection._pipeq_commands_client = self._create_client()
        return shared

    @cached_property
    def held(self) -> dict[str, tuple[bytes, str, str]]:
        """delivery tag -> (the message as Redis holds it, its queue, its job id)"""
        return {}

    @property
    def _fence(self) -> str:
        return self.pipeq_lease.key if self.pipeq_lease is not None else ""

    def _owned(self, reply: Any, where: str) -> Any:
        return reply if self.pipeq_lease is None else self.pipeq_lease.check(reply, where)

    @property
    def _acks(self) -> list[bytes]:
        """Messages acknowledged and not yet out of the in-flight list: they leave it
        together, before the consumer's next take (or as the channel closes). One list a
        worker, whichever of its channels a message came through: a reconnection replaces
        the channel while job threads still acknowledge the old one's messages, and
        nothing flushed a replaced channel's (they stayed in the list)."""
        return _PENDING_ACKS.setdefault(self.pipeq_inflight, [])

    @property
    def _acks_lock(self) -> threading.Lock:
        return _PENDING_LOCK

    def ack_held(self, raw: bytes, where: str) -> None:
        """Out of this worker's list now (a copy dropped), if it owns it."""
        reply = retrying(self.ledger.script("ack"), [self.pipeq_inflight, self._fence], [raw])
        self._owned(reply, where)

    def defer_ack(self, raw: bytes) -> None:
        """Acknowledged (its result is stored): out of the list with the next flush. A
        message acknowledged but not yet flushed when its worker dies is put back by
        the ledger like any other, and dropped before compute (its result is stored)."""
        with self._acks_lock:
            self._acks.append(raw)
            full = len(self._acks) >= ACKS_MAX
        if full:
            self.flush_acks()

    def flush_acks(self, wait: bool = True) -> None:
        """Every acknowledged message out of the in-flight list, in one step. `wait`:
        while Redis is away or refuses writes, try again (`retrying`); else leave them
        for the next flush (the event loop's timer never waits on Redis)."""
        with self._acks_lock:
            raws, self._acks[:] = list(self._acks), []
        if not raws:
            return
        ack = self.ledger.script("ack")
        keys = [self.pipeq_inflight, self._fence]
        try:
            reply = retrying(ack, keys, raws) if wait else ack(keys, raws)
        except BaseException as e:
            with self._acks_lock:
                self._acks[:0] = raws  # tried again with the next flush
            if not wait and isinstance(e, redis.RedisError):
                return
            raise
        self._owned(reply, f"acknowledging {len(raws)} job(s)")

    def close(self) -> None:
        try:
            self.flush_acks()
        except Exception as e:  # Redis away: the ledger puts them back, dropped as done
            log.warning("could not flush %d acknowledgement(s): %s", len(self._acks), e)
        if self._in_poll and self._blmove_queue is not None:
            # kombu would wait for the BLMOVE's reply (up to its timeout, IDLE_WAIT_S) to
            # hand back what it took: drop the connection instead. A message it took
            # meanwhile is in this worker's list, which the heartbeat's withdraw (the last
            # step of a stop) gives to the other workers at once, like a dead worker's.
            _ORPHANS_POSSIBLE.add(self.pipeq_inflight)  # a reconnection, not a stop
            self.client.connection.disconnect()
            self._in_poll = None  # type: ignore[assignment]
            self._blmove_queue = None
        super().close()

    def requeue(self, raw: bytes, queue: str) -> None:
        """Back to the front of its queue, if it is still in this worker's list."""
        keys = [self.pipeq_inflight, queue, self._fence]
        self._owned(retrying(self.ledger.script("requeue"), keys, [raw]), "handing a job back")

    def _queue_bind(self, *args: Any) -> None:
        """kombu's binding (a SADD, when the consumer starts or restarts), waiting while
        Redis refuses writes rather than stopping the worker."""
        retrying(super()._queue_bind, *args)

    def _size(self, queue: str) -> int:
        """kombu's length of a queue (LLENs in a MULTI, when the consumer declares its
        queue: as it starts or restarts), waiting while Redis refuses them: a full Redis
        refuses a transaction, even of reads: a worker whose consumer started after
        Redis filled stopped at once, "Unrecoverable error" (seen under load in
        test_stalls' full Redis: the heartbeat begins before the consumer)."""
        return int(retrying(super()._size, queue))

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = list(self._active_queues)
        if not self.pipeq_inflight or len(queues) != 1:
            return super()._brpop_start(timeout)  # type: ignore[no-any-return]
        self.flush_acks()
        WorkerChannel._channels.add(self)
        if self.pipeq_inflight in _ORPHANS_POSSIBLE:
            self._put_back_orphans(queues[0])
        self._blmove_queue = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        wait_s = self.brpop_timeout if timeout is None else timeout
        room = self.qos.can_consume_max_estimate()
        source = queues[0]
        self._blmove_from = "main"
        if self.pipeq_high_room and room is not None and room <= self.pipeq_high_room:
            # it holds its share of normal and low jobs: the room left is for high ones
            source, wait_s = level_queue(source, "high"), HIGH_ONLY_WAIT_S
            self._blmove_from = "high"
        self.client.connection.send_command(
            "BLMOVE", source, self.pipeq_inflight, "RIGHT", "LEFT", wait_s or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._blmove_queue
        if queue is None:
            return super()._brpop_read(**options)  # type: ignore[no-any-return]
        try:
            try:
                raw = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                _ORPHANS_POSSIBLE.add(self.pipeq_inflight)  # it may have taken one
                self.client.connection.disconnect()
                raise
            except redis.ResponseError as e:
                reason = write_refusal(e)
                if reason is None:
                    raise
                # Redis refuses writes: no message taken; wait, then try again (a pause,
                # not a crash: the consumer goes on, the jobs held keep waiting)
                if self._refused == 0:
                    log.warning(
                        "Redis refuses writes (%s): taking no job until it takes them", reason
                    )
                self._refused += 1
                time.sleep(BACKOFF.compute(self._refused))
                raise Empty() from None
            if self._refused:
                log.warning("Redis takes writes again: taking jobs")
                self._refused = 0
            if raw is None:
                raise Empty()
            # a doorbell (high or low jobs wait, `_ledger` Priorities), or a message that
            # high ones go before: out of the list now, and not delivered
            first = "bell" if raw == DOORBELL else self._blmove_from
            gone, more = self._take_more(queue, first)
            delivered = 0
            for message in more if gone else [raw, *more]:
                try:
                    self._take(message, queue)
                    delivered += 1
                except Empty:  # set aside, or handed back: the others go on
                    pass
            if not delivered:
                raise Empty()
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._blmove_queue = None
            self._flush_brpop_reauth()

    def _take_more(self, queue: str, first: str) -> tuple[bool, list[bytes]]:
        """After BLMOVE's first message, up to a batch's worth more in one step (as many
        as the consumer may still hold, less the room kept for high jobs unless they are
        high), high first, then normal, then low: a backlog costs a round trip a batch, not
        a job. `first`: what BLMOVE took ("bell": a doorbell, "main": a message of the
        queue, "high": one of its high list). Returns whether what BLMOVE took left the
        in-flight list (a doorbell; a message that high ones waiting go before, back at the
        front of its queue), and the messages taken."""
        room = self.qos.can_consume_max_estimate()
        n = self.pipeq_take_max if room is None else min(self.pipeq_take_max, room)
        rest = n if room is None else min(n, room - self.pipeq_high_room)
        rest -= 1 if first == "main" else 0  # what BLMOVE took is one of them
        keys = [queue, self.pipeq_inflight, self._fence]
        keys += [level_queue(queue, "high"), level_queue(queue, "low")]
        take = self.ledger.script("take")
        args = [max(n - 1, 0), first, max(rest, 0)]
        try:  # tried again only while Redis refuses writes (it then took nothing)
            reply = retrying(take, keys, args, retry_for_s=0)
        except (redis.ConnectionError, redis.TimeoutError):
            # it may have taken them and lost the reply: BLMOVE's message and those wait
            # in the list, undelivered, until the next take puts them back
            _ORPHANS_POSSIBLE.add(self.pipeq_inflight)
            raise
        gone, taken = self._owned(reply, "taking jobs")
        return bool(gone), list(taken)

    def _put_back_orphans(self, queue: str) -> None:
        """Messages of the in-flight list that no channel of this process holds back to
        the front of `queue` (`_ledger` orphans): taken by a step whose reply was lost,
        they were never delivered. The caller flushed the acknowledged ones just before
        (`_brpop_start`). (A message whose job thread is acknowledging it at this very
        instant may go back too: it is dropped before compute, its result being stored.)"""
        _ORPHANS_POSSIBLE.discard(self.pipeq_inflight)
        try:
            channels = [
                c for c in WorkerChannel._channels if c.pipeq_inflight == self.pipeq_inflight
            ]
            held = [raw for c in channels for raw, _, _ in c.held.copy().values()]
            keys = [self.pipeq_inflight, queue, self._fence]
            back = self._owned(retrying(self.ledger.script("orphans"), keys, held), "reclaiming")
        except BaseException:
            _ORPHANS_POSSIBLE.add(self.pipeq_inflight)
            raise
        if back:
            log.warning(
                "%d message(s) taken by a step whose reply was lost: back in the queue", back
            )

    def _take(self, raw: bytes, queue: str) -> None:
        try:
            envelope = check_message(raw, max_bytes=self.pipeq_max_message_bytes)
        except Malformed as e:
            self.set_aside(raw, queue, e)
            raise Empty() from None
        if queue not in self.connection._callbacks:  # consumer cancelled meanwhile
            self.requeue(raw, queue)
            raise Empty()
        tag, job_id = envelope["properties"]["delivery_tag"], envelope["headers"]["id"]
        if tag in self.held:  # a copy of a message held already (a retried send): one is enough
            log.warning("dropped a second copy of job %s's message, held already", job_id)
            self.ack_held(raw, f"dropping a copy of job {job_id}'s message")
            raise Empty()
        self.held[tag] = (raw, queue, job_id)
        try:
            self.connection._deliver(envelope, queue)
        except self.connection_errors:
            raise
        except Exception as e:  # Celery could not accept it: never stop the consumer
            log.exception("the consumer could not accept job %s", job_id)
            if self.held.pop(tag, None) is not None:
                why = Malformed(f"the worker could not accept it: {type(e).__name__}: {e}", job_id)
                self.set_aside(raw, queue, why)
            raise Empty() from None

    def set_aside(self, raw: bytes, queue: str, why: Malformed) -> None:
        """Into the dead-letter list with the reason; its job (if named) fails first."""
        log.warning("set aside a malformed message (job %s): %s", why.job_id, why.reason)
        if self.pipeq_on_malformed is not None:
            self.pipeq_on_malformed(raw, why)
        entry = json.dumps(
            {
                "queue": queue,
                "job_id": why.job_id,
                "reason": why.reason,
                "at": time.time(),
                "message": raw[:65536].decode("utf-8", "replace"),
            }
        )
        reply = retrying(
            self.ledger.script("set_aside"),
            [self.pipeq_inflight, DEAD_LETTER, self._fence],
            [raw, entry, DEAD_LETTER_KEEP],
        )
        self._owned(reply, "setting a message aside")


class _FlushesAcks:
    """Flushes the channels' acknowledgements on the event loop's timer too, so that an
    idle consumer (its BLMOVE waiting) does not hold them until the wait ends."""

    channels: list[Any]

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        loop.call_repeatedly(ACK_FLUSH_S, self._flush_acks)

    def _flush_acks(self) -> None:
        for channel in list(self.channels):
            if isinstance(channel, WorkerChannel) and channel._acks:
                channel.flush_acks(wait=False)


class Transport(_FlushesAcks, kombu_redis.Transport):
    """kombu's Redis transport with the worker's channel."""

    Channel = WorkerChannel


class SentinelWorkerChannel(WorkerChannel, kombu_redis.SentinelChannel):
    """`WorkerChannel` over the master kombu's Sentinel channel finds."""

    from_transport_options = (  # type: ignore[assignment]
        *WorkerChannel.from_transport_options,
        *(
            option
            for option in kombu_redis.SentinelChannel.from_transport_options
            if option not in WorkerChannel.from_transport_options
        ),
    )


class SentinelTransport(_FlushesAcks, kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with the worker's channel."""

    Channel = SentinelWorkerChannel
