"""Faults injected into real worker processes by the fault tests, never by pipeq itself.

Python imports `sitecustomize` at start-up from sys.path; the fault tests put this
folder on PYTHONPATH of the workers they start, with PIPEQ_FAULTS set. A forward pass
over an input containing:

    pipeq-fault:kill        SIGKILLs the worker (a job that kills its worker every time)
    pipeq-fault:sleep=<s>   sleeps that long first (a long job)
    pipeq-fault:panic       raises PanicException, a BaseException as the Rust tokenizer's
                            (pyo3_runtime.PanicException) is

With $PIPEQ_FAULTS_OOM_ABOVE=<n>, a forward pass over more than n inputs raises
torch.OutOfMemoryError (a batch too big for the GPU's memory), after logging its inputs
and a line "<pid>\tpipeq-oom:<batch size>".

Every forward pass sleeps $PIPEQ_FAULTS_FORWARD_S first (a slow model), every
continuous-batching decoding step $PIPEQ_FAULTS_STEP_S (a slow generator), and a
continuous-batching manager's stop $PIPEQ_FAULTS_STOP_S after it stopped (a slow stop), and
the consumer's declaring of its queue $PIPEQ_FAULTS_DECLARE_S first (a slow start). With
$PIPEQ_FAULTS_LOG, each forward appends one line per input: "<pid>\t<input>".

With $PIPEQ_FAULTS_LOSE_REPLIES="blmove=<n>,take=<m>,flush=<k>", the first n BLMOVE
replies that carry a message, the first m `take` replies that carry any, and the first k
replies of a heartbeat that flushes metrics' increments are lost after Redis ran the
command: the connection drops (redis.ConnectionError), as when Redis or the network fails
between the two.

A continuous-batching job whose prompt contains `pipeq-fault:step-error` (or
`pipeq-fault:step-panic`) makes the manager's next decoding step raise IndexError (or
PanicException) once, as an over-long request did inside transformers' loop.
"""

import os

if os.environ.get("PIPEQ_FAULTS"):
    import re
    import signal
    import time

    from pipeq.worker import handlers

    _run = handlers.Handler._run
    _SLEEP = re.compile(r"pipeq-fault:sleep=([0-9.]+)")

    class PanicException(BaseException):  # pyo3_runtime's name
        """What pyo3 raises for a Rust panic: not an Exception."""

    def _faulty_run(self, items, params):  # type: ignore[no-untyped-def]
        _inject(items)
        return _run(self, items, params)

    def _inject(items):  # type: ignore[no-untyped-def]
        texts = [str(i) for i in items]
        log = os.environ.get("PIPEQ_FAULTS_LOG")
        if log:
            with open(log, "a") as f:
                f.writelines(f"{os.getpid()}\t{t}\n" for t in texts)
        if any("pipeq-fault:kill" in t for t in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        oom_above = int(os.environ.get("PIPEQ_FAULTS_OOM_ABOVE") or 0)
        if oom_above and len(items) > oom_above:
            import torch

            if log:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\tpipeq-oom:{len(items)}\n")
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected: a batch of {len(items)} > {oom_above})"
            )
        if any("pipeq-fault:panic" in t for t in texts):
            raise PanicException("called `Option::unwrap()` on a `None` value (injected)")
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_FORWARD_S") or 0))
        for t in texts:
            found = _SLEEP.search(t)
            if found:
                time.sleep(float(found.group(1)))

    handlers.Handler._run = _faulty_run
    _forward = handlers.Staged.forward

    def _faulty_forward(self):  # type: ignore[no-untyped-def]
        _inject(self.items)  # a pipelined batch's forward pass (`pipelining = true`)
        return _forward(self)

    handlers.Staged.forward = _faulty_forward

    from transformers.generation.continuous_batching import continuous_api

    _step = continuous_api.ContinuousBatchingManager._generation_step

    def _slow_step(self):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_STEP_S") or 0))
        fault = getattr(self, "pipeq_fault", None)
        if fault is not None:
            self.pipeq_fault = None
            raise fault
        return _step(self)

    from pipeq.worker import generation

    _start = generation.ContinuousBatcher._start

    def _faulty_start(self, new, writes, done):  # type: ignore[no-untyped-def]
        prompts = " ".join(r.prompt for r in new)
        if "pipeq-fault:step-error" in prompts:
            self.manager.pipeq_fault = IndexError("index out of range in self (injected)")
        elif "pipeq-fault:step-panic" in prompts:
            self.manager.pipeq_fault = PanicException("injected panic in a decoding step")
        return _start(self, new, writes, done)

    generation.ContinuousBatcher._start = _faulty_start

    continuous_api.ContinuousBatchingManager._generation_step = _slow_step

    _stop = continuous_api.ContinuousBatchingManager.stop

    def _slow_stop(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _stop(self, *args, **kwargs)
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_STOP_S") or 0))

    continuous_api.ContinuousBatchingManager.stop = _slow_stop

    from kombu.transport import redis as kombu_redis

    _size = kombu_redis.Channel._size

    def _slow_size(self, queue):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_DECLARE_S") or 0))
        return _size(self, queue)

    kombu_redis.Channel._size = _slow_size

    _lose = dict(
        (kind, int(n))
        for kind, _, n in (
            part.partition("=")
            for part in (os.environ.get("PIPEQ_FAULTS_LOSE_REPLIES") or "").split(",")
            if part
        )
    )
    if _lose:
        import redis

        from pipeq._ledger import Ledger

        def _lost(kind: str) -> bool:
            if _lose.get(kind, 0) <= 0:
                return False
            _lose[kind] -= 1
            print(f"pipeq-fault: the reply of a {kind} is lost", flush=True)
            return True

        _parse = redis.Redis.parse_response

        def _lossy_parse(self, connection, command_name, **options):  # type: ignore[no-untyped-def]
            reply = _parse(self, connection, command_name, **options)
            if command_name == "BLMOVE" and reply is not None and _lost("blmove"):
                connection.disconnect()
                raise redis.ConnectionError("the BLMOVE reply was lost (injected)")
            return reply

        redis.Redis.parse_response = _lossy_parse

        _execute = redis.client.Pipeline.execute

        def _lossy_execute(self, raise_on_error=True):  # type: ignore[no-untyped-def]
            flushes = any("pipeq:metrics:" in str(args) for args, _ in self.command_stack)
            reply = _execute(self, raise_on_error)
            if flushes and _lost("flush"):
                raise redis.ConnectionError("the heartbeat's reply was lost (injected)")
            return reply

        redis.client.Pipeline.execute = _lossy_execute

        _script = Ledger.script

        def _lossy_script(self, name):  # type: ignore[no-untyped-def]
            script = _script(self, name)
            if name != "take":
                return script

            def take(keys, args, client=None):  # type: ignore[no-untyped-def]
                reply = script(keys, args, client=client)
                if isinstance(reply, list) and (reply[0] or reply[1]) and _lost("take"):
                    raise redis.ConnectionError("the take reply was lost (injected)")
                return reply

            return take

        Ledger.script = _lossy_script
