"""Where every job is, in Redis, and the atomic steps that move it from place to place.

    pipeq.<deployment>            list    messages waiting (LPUSH in, BLMOVE out from the right),
                                          and a doorbell when high or low ones wait (below)
    pipeq.<deployment>:high       list    messages of high priority waiting (`PRIORITIES`)
    pipeq.<deployment>:low        list    messages of low priority waiting
    pipeq:inflight:<worker>       list    messages a worker took and has not acknowledged yet
    pipeq:fenced:<worker>         string  the worker was declared dead and its list put back:
                                          it owns nothing any more (see "Fencing" below)
    pipeq:waiting:<deployment>    zset    job id -> accepted at (+ its level's offset, below):
                                          accepted, not yet running
    pipeq:running:<deployment>    zset    job id -> accepted at: forward pass begun, no result yet
    pipeq:workers:<deployment>    zset    worker -> its last heartbeat
    pipeq:dead-after:<deployment> hash    worker -> the silence after which it counts as dead
    pipeq:job:<id>                string  the deployment of a job pipeq accepted
    pipeq:submitted:<id>          hash    who submitted it through `pipeq serve` (owner,
                                          deployment, digest, created_at, priority)
    pipeq:cancel:<id>             string  the job must not run: cancelled, or forgotten
    pipeq:deadline:<id>           string  the job's `expires` deadline, on Redis' clock (unix s)
    pipeq:stream:<id>             stream  a generation's text as it is made (`Job.stream`)
    pipeq:attempts:<id>           string  how many times the job's worker died while running it
    celery-task-meta-<id>         string  Celery's result record (status, result, ...), JSON
    pipeq:dead-letter             list    messages no worker could read, and why (newest first)
    pipeq:metrics:<deployment>    hash    outcome counters, histogram buckets (`_metrics`)
    pipeq:recent:<deployment>:<t> hash    outcomes in one 10 s slot (`_metrics`)
    pipeq:flushed:<worker>        string  the number of the worker's last flush of its
                                          observations into `pipeq:metrics:` (`increments`)

Times are Redis' own clock (`TIME`, unix seconds), so machines with skewed clocks agree
on ages and on who is dead. Each step that moves a job is one Lua script, so a process
killed between two commands can neither lose a job nor hold it twice:

- `enqueue` (producer): refuse past `max_queue_length`, else record and push, at once
  (and publish the job's task-sent event, for Flower); a deadline given in seconds
  (`expires=60`) is counted from Redis' clock there, never from the producer's; for
  `pipeq serve`, also refuse a job id already taken, and record who submitted it;
- `cancel` (producer): a job that has not started, or a generation its worker marked
  stoppable (continuous batching stops it at its next step); any other started one
  says so;
- `forget` (producer): a finished job's records go, and it may never run again;
- `admit` (worker, before a forward pass): drop cancelled, expired and finished jobs,
  set redelivered suspects apart, mark the rest STARTED and running;
- `store` (worker): a result is stored once; a finished job leaves waiting and running;
- `take` (worker): up to a batch's worth of messages more into its in-flight list in one
  step (BLMOVE waits for the first), high before normal before low; `ack` takes any number
  out of it;
- `beat` (worker heartbeat): re-announce the deployment and, for each worker of the same
  deployment whose heartbeat stopped `dead_after_s` ago, put the jobs it held back at
  the front of the queue (only once Redis itself has been up that long: a restarted
  Redis has not heard from live workers yet). A job whose worker died while running it
  counts an attempt; at `max_attempts` it fails with JobLost instead.

Priorities. A job of level `high` or `low` waits in its level's own list; one of `normal`
(the default, and every producer that names none) in the deployment's queue as before.
Workers wait (BLMOVE) on the queue alone, so `enqueue` puts a doorbell (`DOORBELL`) in the
queue with a high or low job when the queue is empty (else no worker waits on it): a
waiting worker wakes, and its `take` moves messages high first, then the queue's own (dropping the
doorbells it meets), then low. A `take` that leaves high or low jobs behind an empty queue
rings again, so they never wait with no doorbell for the workers. A message put back (its
worker died, or handed it back as it stopped) goes to the front of the queue, whatever its
level: it was taken once already. In `waiting` a job's score is its acceptance time plus
its level's offset (`LEVEL_OFFSET`: high 1e10 s, low 2e10 s, normal 0, as before), so
depth and age by level are ranges of one sorted set and leaving it is one ZREM, as before.

Fencing. A worker's in-flight list is its own while it beats; a worker silent for
`dead_after_s` (frozen by SIGSTOP, a paused VM, a long stall) may still be alive. When
`beat` puts back the jobs of a silent worker it fences that worker (`pipeq:fenced:<worker>`),
and every script a worker runs for what it holds checks its fence in the same step:
`admit`, `store`, `ack`, `requeue`, `set_aside`, `append` (stream pieces) and its own
`beat` answer FENCED instead of writing. A worker that gets FENCED owns nothing: it stores,
acknowledges and writes nothing more and exits (`pipeq.worker.liveness.Lease`), so its
jobs run once more elsewhere and never twice from two owners. A judge that was itself
silent for `dead_after_s` (Redis stalled, or its own process) judges no one on that beat:
after a Redis stall every worker looks silent, and none is dead.

Redis Cluster is not supported (Celery's Redis transport does not support it either):
these scripts touch keys they derive from job ids.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis

__all__ = [
    "DEAD_LETTER",
    "META_PREFIX",
    "Depth",
    "Ledger",
    "FENCED",
    "cancel_key",
    "deadline_key",
    "fence_key",
    "inflight_key",
    "DOORBELL",
    "LEVEL_OFFSET",
    "LEVEL_SPAN",
    "PRIORITIES",
    "PRIORITY_HEADER",
    "job_key",
    "level_queue",
    "meta_json",
    "queue_for",
    "stream_key",
    "submitted_key",
    "workers_key",
]

META_PREFIX = "celery-task-meta-"  # Celery's RedisBackend.task_keyprefix
DEAD_LETTER = "pipeq:dead-letter"
#: entries kept in the dead-letter list (oldest dropped first)
DEAD_LETTER_KEEP = 1000
READY = ("SUCCESS", "FAILURE", "REVOKED")  # celery.states.READY_STATES
#: what a worker's script answers, writing nothing, once the worker was fenced
FENCED = -1
#: priority levels, most urgent first: a job's `priority` (default "normal"). Three, not
#: Celery's 0-9 on Redis (0 first) or AMQP's 0-255 (255 first): interactive, the default,
#: bulk are the distinctions producers make, and names cannot be read the wrong way round.
PRIORITIES = ("high", "normal", "low")
#: the scores of one level in the `waiting` sorted set span this much (s): acceptance times
#: are unix seconds, below 1e10 until the year 2286
LEVEL_SPAN = 1e10
#: a level's offset in those scores (normal 0: as before priorities)
LEVEL_OFFSET = {"high": LEVEL_SPAN, "normal": 0.0, "low": 2 * LEVEL_SPAN}
#: what `enqueue` puts in a deployment's queue to wake a worker for a high or low job
DOORBELL = b"pipeq:doorbell"
#: the message header that carries a job's level (absent: normal)
PRIORITY_HEADER = "pipeq_priority"


def queue_for(deployment: str, priority: str = "normal") -> str:
    """The list a deployment's jobs of `priority` wait in."""
    return level_queue(f"pipeq.{deployment}", priority)


def level_queue(queue: str, priority: str) -> str:
    """The list of a deployment's queue's jobs of `priority`."""
    return queue if priority == "normal" else f"{queue}:{priority}"


def waiting_key(deployment: str) -> str:
    return f"pipeq:waiting:{deployment}"


def running_key(deployment: str) -> str:
    return f"pipeq:running:{deployment}"


def workers_key(deployment: str) -> str:
    return f"pipeq:workers:{deployment}"


def dead_after_key(deployment: str) -> str:
    return f"pipeq:dead-after:{deployment}"


def inflight_key(worker: str) -> str:
    return f"pipeq:inflight:{worker}"


def fence_key(worker: str) -> str:
    return f"pipeq:fenced:{worker}"


def job_key(job_id: str) -> str:
    return f"pipeq:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"pipeq:cancel:{job_id}"


def deadline_key(job_id: str) -> str:
    return f"pipeq:deadline:{job_id}"


def stream_key(job_id: str) -> str:
    return f"pipeq:stream:{job_id}"


def submitted_key(job_id: str) -> str:
    return f"pipeq:submitted:{job_id}"


def meta_json(job_id: str, status: str, result: Any = None, *, done: bool = False) -> str:
    """A result record as Celery's JSON backend writes it."""
    date_done = datetime.datetime.now(datetime.UTC).isoformat() if done else None
    return json.dumps(
        {
            "status": status,
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": date_done,
            "task_id": job_id,
        }
    )


def error_result(exc_type: str, message: str, module: str = "pipeq.errors") -> dict[str, Any]:
    """An exception as Celery's JSON backend stores it (`Backend.prepare_exception`)."""
    return {"exc_type": exc_type, "exc_message": [message], "exc_module": module}


# every script that writes after reading TIME needs effects replication on Redis 6.2
# (the default from Redis 7 on, where this call is a no-op)
#: the two above for the scripts: the offset by level, and the offsets in `PRIORITIES` order
_LEVELS = (
    f"local LEVEL_SPAN = {LEVEL_SPAN:.0f}\n"
    + "local LEVEL_OFFSET = {"
    + ", ".join(f"{level} = {offset:.0f}" for level, offset in LEVEL_OFFSET.items())
    + "}\nlocal LEVEL_OFFSETS = {"
    + ", ".join(f"{LEVEL_OFFSET[level]:.0f}" for level in PRIORITIES)
    + "}\n"
)

_CLOCK = (
    _LEVELS
    + """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function status_of(meta)
  if not meta then return nil end
  local ok, m = pcall(cjson.decode, meta)
  if ok and type(m) == 'table' then return m['status'], m end
  return nil
end
local function ready(status)
  return status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED'
end
-- `cmd key values...` in steps of 1,000 values: one command a batch, within the limit of
-- Lua's `unpack` (8,000 values in Redis' Lua 5.1). `step`: values an item (ZADD's 2).
-- Returns the steps' list replies joined (ZMSCORE's scores; false where there is none)
local function call_many(cmd, key, values, step)
  local size, out = 1000 * (step or 1), {}
  for i = 1, #values, size do
    local reply = redis.call(cmd, key, unpack(values, i, math.min(#values, i + size - 1)))
    if type(reply) == 'table' then
      for k = 1, #reply do out[#out + 1] = reply[k] end
    end
  end
  return out
end
-- a `waiting` score's acceptance time (its level's offset taken off: LEVEL_OFFSET)
local function accepted_at(score)
  if not score then return nil end
  return math.fmod(tonumber(score), LEVEL_SPAN)
end
-- `n` jobs (1 if not given) ended with this outcome (`_metrics`): counted once, where each
-- one's final state is first stored
local function count_outcome(deployment, outcome, n)
  if not deployment or outcome == '' then return end
  redis.call('HINCRBY', 'pipeq:metrics:' .. deployment, 'jobs_total:' .. outcome, n or 1)
  local slot = 'pipeq:recent:' .. deployment .. ':' .. string.format('%d', math.floor(now / 10))
  redis.call('HINCRBY', slot, outcome, n or 1)
  redis.call('EXPIRE', slot, 400)
end
"""
)

_ENQUEUE = (
    _CLOCK
    + """
-- KEYS: queue, waiting, job, deadline, level's queue (the queue itself for normal)[,
-- submitted, meta]
-- ARGV: message, id, limit, ttl, deployment, event, channel, expires in s from now
-- ('' = none), expires at (unix s, '' = none), level ('' = normal)[, owner, digest]
-- returns 1 (pushed, or pushed already), 0 (the queue is full), 2 (with `submitted`: the
-- id is taken)
-- the job accepted already: for `pipeq serve`, an id taken; for a producer (whose ids are
-- new uuid4s), its own send tried again after the reply was lost (Celery's publish retry):
-- one message is enough (two workers would each run a copy)
if redis.call('EXISTS', KEYS[3]) == 1 then return KEYS[6] and 2 or 1 end
if KEYS[6] and (redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[7]) == 1) then
  return 2
end
local limit = tonumber(ARGV[3])
if limit > 0 and redis.call('ZCARD', KEYS[2]) >= limit then return 0 end
redis.call('ZADD', KEYS[2], 'NX', now + (LEVEL_OFFSET[ARGV[10]] or 0), ARGV[2])
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[4])
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[4], tostring(now + tonumber(ARGV[8])), 'EX', ARGV[4])
elseif ARGV[9] ~= '' then
  redis.call('SET', KEYS[4], ARGV[9], 'EX', ARGV[4])
end
if KEYS[6] then
  redis.call('HSET', KEYS[6], 'owner', ARGV[11], 'deployment', ARGV[5], 'digest', ARGV[12],
    'created_at', tostring(now), 'priority', ARGV[10] ~= '' and ARGV[10] or 'normal')
  redis.call('EXPIRE', KEYS[6], ARGV[4])
end
redis.call('LPUSH', KEYS[5], ARGV[1])
-- wakes a waiting worker (Priorities): only an empty queue has workers waiting on it; one
-- that holds anything is taken from, and every take looks at the levels' lists first
if KEYS[5] ~= KEYS[1] and redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('LPUSH', KEYS[1], 'pipeq:doorbell')
end
if ARGV[6] and ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[6]) end
return 1
"""
)

_CANCEL = (
    _CLOCK
    + """
-- KEYS: meta, cancel, job ; ARGV: revoked meta, ttl, id
local meta = redis.call('GET', KEYS[1])
local status = status_of(meta)
if ready(status) then return 'finished' end
if status == 'STARTED' then
  local result = cjson.decode(meta)['result']
  if type(result) ~= 'table' or result['stoppable'] ~= true then return 'running' end
end
local deployment = redis.call('GET', KEYS[3])
if not deployment and not meta then return 'unknown' end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
if deployment then
  redis.call('ZREM', 'pipeq:waiting:' .. deployment, ARGV[3])
  redis.call('ZREM', 'pipeq:running:' .. deployment, ARGV[3])
end
count_outcome(deployment, 'cancelled')
return 'cancelled'
"""
)

_FORGET = (
    _CLOCK
    + """
-- KEYS: meta, job, cancel, stream, attempts ; ARGV: ttl
local status = status_of(redis.call('GET', KEYS[1]))
if not ready(status) then
  if status or redis.call('EXISTS', KEYS[2]) == 1 then return 'unfinished' end
  return 'unknown'
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
-- a copy of its message left in Redis (a retried send, a dead worker's list) is dropped
-- before compute, as a cancelled job's is: a forgotten job never comes back
redis.call('SET', KEYS[3], 'forgotten', 'EX', ARGV[1])
return 'forgotten'
"""
)

_STORE = (
    _CLOCK
    + """
-- the results of jobs that ended together (a worker's group commit: `_app.Backend`), in one
-- step. KEYS: meta[n] ; ARGV: the worker ('' for none), the worker's deployment ('' for
-- none), then for each key: value, ttl, id, is_ready, outcome ('' for none)
-- returns for each key 1 (stored) or 0 (a finished job's result is kept), or -1 (nothing
-- done) if the worker was fenced
if ARGV[1] ~= '' and redis.call('EXISTS', 'pipeq:fenced:' .. ARGV[1]) == 1 then return -1 end
local out, ended, counts = {}, {}, {}
for i, key in ipairs(KEYS) do
  local b = 2 + 5 * (i - 1)
  local value, ttl, id = ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3]
  local got = redis.call('MGET', key, 'pipeq:job:' .. id)  -- a missing one is false
  if ready(status_of(got[1])) then
    out[i] = 0
  else
    if ttl > 0 then redis.call('SET', key, value, 'EX', ttl) else redis.call('SET', key, value) end
    redis.call('PUBLISH', key, value)
    local deployment = got[2]
    if ARGV[b + 4] == '1' and deployment then
      ended[deployment] = ended[deployment] or {}
      table.insert(ended[deployment], id)
    end
    -- a job sent around pipeq's client (not in the ledger) counts for the worker that ran it
    if not deployment and ARGV[2] ~= '' then deployment = ARGV[2] end
    local outcome = ARGV[b + 5]
    if deployment and outcome ~= '' then
      counts[deployment] = counts[deployment] or {}
      counts[deployment][outcome] = (counts[deployment][outcome] or 0) + 1
    end
    out[i] = 1
  end
end
for deployment, ids in pairs(ended) do
  call_many('ZREM', 'pipeq:waiting:' .. deployment, ids)
  call_many('ZREM', 'pipeq:running:' .. deployment, ids)
end
for deployment, by_outcome in pairs(counts) do
  for outcome, n in pairs(by_outcome) do count_outcome(deployment, outcome, n) end
end
return out
"""
)

_ADMIT = (
    _CLOCK
    + """
-- KEYS: waiting, running ; ARGV: ttl, worker, pid, alone, n, ids[n], expires[n] ('' = none),
-- stoppable ('1': the worker stops the job at its next step when it is cancelled)
-- returns the verdicts, and for each job leaving `waiting` now the seconds it waited;
-- -1 (nothing done) if the worker was fenced
if redis.call('EXISTS', 'pipeq:fenced:' .. ARGV[2]) == 1 then return -1 end
local n = tonumber(ARGV[5])
local stoppable = ARGV[6 + 2 * n] == '1' and ', "stoppable": true' or ''
local out, waited, left, ran, ids = {}, {}, {}, {}, {}
for i = 1, n do ids[i] = ARGV[5 + i] end
-- each job's `waiting` score (false: not waiting), one command a batch
local scores = call_many('ZMSCORE', KEYS[1], ids)
for i = 1, n do
  local id = ids[i]
  local key = 'celery-task-meta-' .. id
  -- the job's keys in one read (a missing one is false)
  local got = redis.call('MGET', 'pipeq:deadline:' .. id, 'pipeq:attempts:' .. id,
    'pipeq:cancel:' .. id, key, 'pipeq:job:' .. id)
  -- pipeq's Client sets the deadline in Redis (`enqueue`); another producer's `expires`
  -- header comes as an argument
  local deadline = got[1] or ARGV[5 + n + i]
  local attempts = tonumber(got[2] or '0')
  local verdict
  if got[3] then
    verdict = 'cancelled'
  elseif ready(status_of(got[4])) then
    verdict = 'done'
  elseif deadline ~= '' and now > tonumber(deadline) then
    verdict = 'expired'
  elseif ARGV[4] == '0' and attempts > 0 then
    verdict = 'quarantine'
  else
    verdict = 'run'
    local started = '{"status": "STARTED", "result": {"hostname": ' .. cjson.encode(ARGV[2])
      .. ', "pid": ' .. ARGV[3] .. stoppable .. '}, "traceback": null, "children": [], '
      .. '"date_done": null, "task_id": ' .. cjson.encode(id) .. '}'
    redis.call('SET', key, started, 'EX', ARGV[1])
    redis.call('PUBLISH', key, started)
    if got[5] then  -- counted only if accepted here
      local accepted = accepted_at(scores[i])
      -- its first forward pass only: a job back from a dead worker has run before
      if accepted and attempts == 0 then waited[i] = tostring(now - tonumber(accepted)) end
      table.insert(left, id)
      table.insert(ran, accepted or now)
      table.insert(ran, id)
    end
  end
  if verdict ~= 'run' and verdict ~= 'quarantine' then table.insert(left, id) end
  out[i] = verdict
  waited[i] = waited[i] or ''
end
-- the batch leaves `waiting` (and enters `running`) in one command each
call_many('ZREM', KEYS[1], left)
call_many('ZADD', KEYS[2], ran, 2)
return {out, waited}
"""
)

_BEAT = (
    _CLOCK
    + """
-- KEYS: workers, deployments, queue, waiting, running, dead-after (hash), stats (hash)
-- ARGV: me, name, info, dead_after, forget_after, stats ('' = unchanged), max_attempts, ttl,
-- date_done
-- returns {jobs put back, ids failed JobLost}, or -1 (nothing done) if `me` was fenced
if redis.call('EXISTS', 'pipeq:fenced:' .. ARGV[1]) == 1 then return -1 end
-- a judge silent itself for dead_after_s (Redis stalled, or this process) judges no one now:
-- the others were silent for the same reason
local last_beat = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or now)
local judge = last_beat >= now - tonumber(ARGV[4])
-- announced when new: a first beat, or a Redis that lost its data (or forgot this worker)
if redis.call('ZADD', KEYS[1], now, ARGV[1]) == 1 then
  redis.call('HSET', KEYS[6], ARGV[1], ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[6])
  redis.call('EXPIRE', KEYS[7], math.floor(tonumber(ARGV[5])))
end
local moved, lost = 0, {}
local uptime = nil
local silent = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'WITHSCORES')
for d = 1, #silent, 2 do
  local owner, seen = silent[d], tonumber(silent[d + 1])
  -- each worker is judged by the dead_after_s it beats for, not by the judge's own
  local dead_after = tonumber(redis.call('HGET', KEYS[6], owner) or ARGV[4])
  local inflight = 'pipeq:inflight:' .. owner
  if judge and owner ~= ARGV[1] and seen < now - dead_after and not uptime then
    -- a Redis that has just (re)started has not heard from the live workers yet
    uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
  end
  if judge and owner ~= ARGV[1] and seen < now - dead_after and uptime >= dead_after then
    local items = redis.call('LRANGE', inflight, 0, -1)
    -- it may be frozen, not dead: if it comes back, it owns none of these any more
    if #items > 0 then redis.call('SET', 'pipeq:fenced:' .. owner, 1, 'EX', ARGV[8]) end
    -- newest first: pushing each to the right puts the oldest at the front of the queue
    for i = 1, #items do
      local item = items[i]
      local ok, msg = pcall(cjson.decode, item)
      local id = ok and type(msg) == 'table' and type(msg['headers']) == 'table'
        and msg['headers']['id']
      if type(id) ~= 'string' then
        redis.call('RPUSH', KEYS[3], item)  -- the next worker's gate sets it aside
        moved = moved + 1
      else
        local key = 'celery-task-meta-' .. id
        local status, meta = status_of(redis.call('GET', key))
        if ready(status) then
          -- finished before its worker died: nothing to run again
        elseif status == 'STARTED' and type(meta['result']) == 'table'
            and meta['result']['hostname'] == owner then
          local attempts = redis.call('INCR', 'pipeq:attempts:' .. id)
          redis.call('EXPIRE', 'pipeq:attempts:' .. id, ARGV[8])
          local accepted = redis.call('ZSCORE', KEYS[5], id)
          local level = type(msg['headers']['pipeq_priority']) == 'string'
            and LEVEL_OFFSET[msg['headers']['pipeq_priority']] or 0
          redis.call('ZREM', KEYS[5], id)
          if attempts >= tonumber(ARGV[7]) then
            local why = 'its worker died while running it ' .. attempts .. ' times'
            local failed = '{"status": "FAILURE", "result": {"exc_type": "JobLost", '
              .. '"exc_message": [' .. cjson.encode(why) .. '], "exc_module": "pipeq.errors"}, '
              .. '"traceback": null, "children": [], "date_done": ' .. cjson.encode(ARGV[9])
              .. ', "task_id": ' .. cjson.encode(id) .. '}'
            redis.call('SET', key, failed, 'EX', ARGV[8])
            redis.call('PUBLISH', key, failed)
            count_outcome(ARGV[2], 'lost')
            lost[#lost + 1] = id
          else
            redis.call('DEL', key)
            if accepted then redis.call('ZADD', KEYS[4], tonumber(accepted) + level, id) end
            redis.call('RPUSH', KEYS[3], item)
            moved = moved + 1
          end
        else
          redis.call('RPUSH', KEYS[3], item)
          moved = moved + 1
        end
      end
    end
    redis.call('DEL', inflight)
    if seen < now - tonumber(ARGV[5]) then  -- long gone: forget it
      redis.call('ZREM', KEYS[1], owner)
      redis.call('HDEL', KEYS[6], owner)
      redis.call('HDEL', KEYS[7], owner)
    end
  end
end
return {moved, lost}
"""
)

_WITHDRAW = (
    _CLOCK
    + """
-- KEYS: workers ; ARGV: me, dead_after: seen now, and dead at once (reclaimable, not live)
redis.call('ZADD', KEYS[1], now - tonumber(ARGV[2]) - 1, ARGV[1])
return 1
"""
)

_REQUEUE = """
-- KEYS: inflight, queue, fence ; ARGV: message. Only a message still held: one reclaimed
-- meanwhile is in the queue already.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

_INCREMENTS = """
-- KEYS: metrics (hash), the worker's last flush (string) ; ARGV: flush number, ttl, then
-- field, value of each increment (a field ending in ':sum' takes a float)
-- A worker's flush of its observations, applied once: one sent again (its reply was lost
-- with the connection) is skipped. Returns 1 (applied) or 0 (applied already).
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
for i = 3, #ARGV, 2 do
  if string.sub(ARGV[i], -4) == ':sum' then
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

_ORPHANS = """
-- KEYS: inflight, queue, fence ; ARGV: the messages the worker holds (its acknowledged
-- ones left the list before)
-- Every other message of its list goes back to the front of the queue (the oldest first):
-- a step that took it (BLMOVE, take) lost its reply with its connection, so it was never
-- delivered, and the worker's heartbeat would keep it there. Doorbells are dropped.
-- Returns how many went back; -1 (nothing done) if the worker was fenced.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local known, back = {}, 0
for _, raw in ipairs(ARGV) do known[raw] = (known[raw] or 0) + 1 end
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (known[raw] or 0) > 0 then
    known[raw] = known[raw] - 1
  else
    redis.call('LREM', KEYS[1], -1, raw)
    if raw ~= 'pipeq:doorbell' then
      redis.call('RPUSH', KEYS[2], raw)
      back = back + 1
    end
  end
end
return back
"""

_SET_ASIDE = """
-- KEYS: inflight, dead-letter, fence ; ARGV: message, entry, keep
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return 1
"""

_ACK = """
-- KEYS: inflight, fence ; ARGV: messages. Acknowledged: out of the worker's list.
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local removed = 0
for i = 1, #ARGV do removed = removed + redis.call('LREM', KEYS[1], 1, ARGV[i]) end
return removed
"""

_TAKE = """
-- KEYS: queue, inflight, fence, high queue, low queue ; ARGV: n, first, rest. What BLMOVE
-- took is at the head of the worker's list: `first` says from where ('bell': a doorbell
-- from the queue, 'main': a message from the queue, 'high': one from the high list).
-- Up to n more messages into the worker's list, as BLMOVE takes one (the oldest first):
-- high, then the queue's own, then low (ledger's Priorities), of which `rest` at most are
-- not high. What BLMOVE took leaves the list when it is a doorbell, or a message of the
-- queue while high ones wait (back to the front of the queue; one more is taken instead).
-- Returns {1 if what BLMOVE took left the list else 0, {messages taken}}; -1 (nothing
-- done) if the worker was fenced.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local n, rest, taken, gone = tonumber(ARGV[1]), tonumber(ARGV[3]), {}, 0
if ARGV[2] == 'bell' then
  redis.call('LPOP', KEYS[2])
  gone, n = 1, n + 1
elseif ARGV[2] == 'main' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RPUSH', KEYS[1], redis.call('LPOP', KEYS[2]))
  gone, n, rest = 1, n + 1, rest + 1
end
-- a run of messages moves in three commands (LRANGE, LTRIM, LPUSH), as LMOVE would move
-- them one by one: oldest first, doorbells dropped; at most 1,000 a step (Lua's `unpack`)
for i, queue in ipairs({KEYS[4], KEYS[1], KEYS[5]}) do
  while #taken < n and (i == 1 or rest > 0) do
    local k = math.min(n - #taken, 1000)
    if i > 1 then k = math.min(k, rest) end
    local run = redis.call('LRANGE', queue, -k, -1)
    if #run == 0 then break end
    redis.call('LTRIM', queue, 0, -#run - 1)
    local moved = {}
    for j = #run, 1, -1 do
      if run[j] ~= 'pipeq:doorbell' then
        moved[#moved + 1] = run[j]
        taken[#taken + 1] = run[j]
      end
    end
    if #moved > 0 then redis.call('LPUSH', KEYS[2], unpack(moved)) end
    if i > 1 then rest = rest - #moved end
  end
end
-- high or low ones left behind an empty queue: ring for them
if redis.call('LLEN', KEYS[1]) == 0
    and (redis.call('LLEN', KEYS[4]) > 0 or redis.call('LLEN', KEYS[5]) > 0) then
  redis.call('LPUSH', KEYS[1], 'pipeq:doorbell')
end
return {gone, taken}
"""

_APPEND = """
-- KEYS: fence ; ARGV: maxlen, ttl, n, n entries (JSON [job id, field, value, ...]), job ids
-- returns the cancel marks of the job ids (false: not cancelled); -1 if fenced
if redis.replicate_commands then redis.replicate_commands() end
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = tonumber(ARGV[3])
for i = 1, n do
  local entry = cjson.decode(ARGV[3 + i])
  local key = 'pipeq:stream:' .. entry[1]
  local args = {'XADD', key, 'MAXLEN', '~', ARGV[1], '*'}
  for k = 2, #entry do args[#args + 1] = entry[k] end
  redis.call(unpack(args))
  redis.call('EXPIRE', key, ARGV[2])
end
local marks = {}
for i = 4 + n, #ARGV do
  marks[#marks + 1] = redis.call('EXISTS', 'pipeq:cancel:' .. ARGV[i])
end
return marks
"""

_LIVE = """
-- KEYS: workers ; ARGV: live_for. Read-only: TIME needs no replication here.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local age = -1
if #last == 2 then age = now - tonumber(last[2]) end
return {live, tostring(age)}
"""

_DEPTH = (
    _LEVELS
    + """
-- KEYS: waiting, running ; returns {running, then for high, normal, low: waiting, age of the
-- oldest (s)}: each level a range of scores (LEVEL_OFFSET)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {redis.call('ZCARD', KEYS[2])}
for _, offset in ipairs(LEVEL_OFFSETS) do
  local low, high = offset, '(' .. string.format('%.0f', offset + LEVEL_SPAN)
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], low, high, 'WITHSCORES', 'LIMIT', 0, 1)
  local age = 0
  if #oldest == 2 then age = now - (tonumber(oldest[2]) - offset) end
  out[#out + 1] = redis.call('ZCOUNT', KEYS[1], low, high)
  out[#out + 1] = tostring(age)
end
return out
"""
)


@dataclass(frozen=True)
class Depth:
    """A deployment's jobs accepted and not yet running, wherever they wait (the queue in
    Redis or a worker's hands), the age of the oldest (s), and the jobs running now;
    `levels`: the same by priority, level -> (waiting, age of its oldest in s)."""

    waiting: int
    oldest_age_s: float
    running: int
    levels: dict[str, tuple[int, float]] = field(default_factory=dict)


class Ledger:
    """The scripts above, on one Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @cached_property
    def _scripts(self) -> dict[str, Any]:
        return {
            name: self.redis.register_script(text)
            for name, text in (
                ("enqueue", _ENQUEUE),
                ("cancel", _CANCEL),
                ("forget", _FORGET),
                ("store", _STORE),
                ("admit", _ADMIT),
                ("beat", _BEAT),
                ("withdraw", _WITHDRAW),
                ("requeue", _REQUEUE),
                ("orphans", _ORPHANS),
                ("increments", _INCREMENTS),
                ("set_aside", _SET_ASIDE),
                ("ack", _ACK),
                ("take", _TAKE),
                ("append", _APPEND),
                ("live", _LIVE),
                ("depth", _DEPTH),
            )
        }

    def script(self, name: str) -> Any:
        return self._scripts[name]

    # -- producers -------------------------------------------------------------------
    def enqueue(
        self,
        deployment: str,
        job_id: str,
        message: str,
        *,
        limit: int,
        ttl_s: int,
        client: Any = None,
        event: str = "",
        event_channel: str = "",
        expires_in_s: float | None = None,
        expires_at: float | None = None,
        submitted: tuple[str, str] | None = None,
        priority: str = "normal",
    ) -> int:
        """Push a job's message unless `limit` (> 0) jobs already wait: 1 pushed, 0
        refused. An accepted job's `event` (Celery's task-sent, for Flower) is published
        on `event_channel` in the same step. Its deadline, if any: `expires_in_s` seconds
        from now on Redis' clock, or `expires_at` (unix s), judged on Redis' clock by
        `admit`. `submitted` (owner, digest): `pipeq serve`'s record of the job, written
        in the same step; 2 (nothing done) if the id is taken (recorded, known, or with a
        result). `priority`: one of `PRIORITIES` (ValueError else)."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}: {priority!r}")
        keys = [queue_for(deployment), waiting_key(deployment), job_key(job_id)]
        keys += [deadline_key(job_id), queue_for(deployment, priority)]
        args = [message, job_id, limit, ttl_s, deployment, event, event_channel]
        args += ["" if t is None else repr(float(t)) for t in (expires_in_s, expires_at)]
        args.append("" if priority == "normal" else priority)
        if submitted is not None:
            keys += [submitted_key(job_id), META_PREFIX + job_id]
            args += list(submitted)
        return int(self.script("enqueue")(keys, args, client=client))

    def cancel(self, job_id: str, revoked_meta: str, ttl_s: int) -> str:
        """'cancelled' (it will not run on, or stops at its next step), 'running',
        'finished' or 'unknown'."""
        keys = [META_PREFIX + job_id, cancel_key(job_id), job_key(job_id)]
        out = self.script("cancel")(keys, [revoked_meta, ttl_s, job_id])
        return out.decode() if isinstance(out, bytes) else str(out)

    def forget(self, job_id: str, ttl_s: int) -> str:
        """'forgotten' (a finished job's result, record and stream are deleted; it never
        runs again), 'unfinished' (nothing done) or 'unknown'."""
        keys = [
            META_PREFIX + job_id,
            job_key(job_id),
            cancel_key(job_id),
            stream_key(job_id),
            f"pipeq:attempts:{job_id}",
        ]
        out = self.script("forget")(keys, [ttl_s])
        return out.decode() if isinstance(out, bytes) else str(out)

    def forgotten(self, job_id: str) -> bool:
        """The job was forgotten (`forget`): no result, no record, marked never to run."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(cancel_key(job_id))
        pipe.exists(META_PREFIX + job_id, job_key(job_id))
        mark, records = pipe.execute()
        return mark == b"forgotten" and not records

    def depth(self, deployment: str) -> Depth:
        running, *by_level = self.script("depth")(
            [waiting_key(deployment), running_key(deployment)]
        )
        levels = {
            level: (int(by_level[2 * i]), max(0.0, float(by_level[2 * i + 1])))
            for i, level in enumerate(PRIORITIES)
        }
        waiting = sum(n for n, _ in levels.values())
        oldest = max((age for n, age in levels.values() if n), default=0.0)
        return Depth(waiting, oldest, int(running), levels)

    def live(self, deployment: str, live_for_s: float) -> tuple[list[str], float | None]:
        """Workers whose heartbeat is younger than `live_for_s`, and the age of the last
        heartbeat of any (None: no worker ever beat here)."""
        members, age = self.script("live")([workers_key(deployment)], [live_for_s])
        last = float(age)
        return [m.decode() for m in members], (None if last < 0 else last)

    def is_known(self, job_id: str) -> bool:
        return bool(self.redis.exists(job_key(job_id)))
