"""Faults injected into real worker processes by the fault tests, never by pipeq itself.

Python imports `sitecustomize` at start-up from sys.path; the fault tests put this
folder on PYTHONPATH of the workers they start, with PIPEQ_FAULTS set. A forward pass
over an input containing:

    pipeq-fault:kill        SIGKILLs the worker (a job that kills its worker every time)
    pipeq-fault:sleep=<s>   sleeps that long first (a long job)

and every forward pass sleeps $PIPEQ_FAULTS_FORWARD_S first (a slow model), every
continuous-batching decoding step $PIPEQ_FAULTS_STEP_S (a slow generator), and a
continuous-batching manager's stop $PIPEQ_FAULTS_STOP_S after it stopped (a slow stop). With
$PIPEQ_FAULTS_LOG, each forward appends one line per input: "<pid>\t<input>".
"""

import os

if os.environ.get("PIPEQ_FAULTS"):
    import re
    import signal
    import time

    from pipeq.worker import handlers

    _run = handlers.Handler._run
    _SLEEP = re.compile(r"pipeq-fault:sleep=([0-9.]+)")

    def _faulty_run(self, items, params):  # type: ignore[no-untyped-def]
        texts = [str(i) for i in items]
        log = os.environ.get("PIPEQ_FAULTS_LOG")
        if log:
            with open(log, "a") as f:
                f.writelines(f"{os.getpid()}\t{t}\n" for t in texts)
        if any("pipeq-fault:kill" in t for t in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_FORWARD_S") or 0))
        for t in texts:
            found = _SLEEP.search(t)
            if found:
                time.sleep(float(found.group(1)))
        return _run(self, items, params)

    handlers.Handler._run = _faulty_run

    from transformers.generation.continuous_batching import continuous_api

    _step = continuous_api.ContinuousBatchingManager._generation_step

    def _slow_step(self):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_STEP_S") or 0))
        return _step(self)

    continuous_api.ContinuousBatchingManager._generation_step = _slow_step

    _stop = continuous_api.ContinuousBatchingManager.stop

    def _slow_stop(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _stop(self, *args, **kwargs)
        time.sleep(float(os.environ.get("PIPEQ_FAULTS_STOP_S") or 0))

    continuous_api.ContinuousBatchingManager.stop = _slow_stop
