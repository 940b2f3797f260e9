"""Celery's `revoke` control command, as pipeq workers answer it: `Job.cancel()`'s cancel.

`app.control.revoke(id, terminate=True)`, `celery control revoke` and Flower's Terminate
reach every worker as a broadcast. Celery's own handler would, with `terminate`, ask the
pool to kill the process running the job: the threads pool cannot (it raised
`NotImplementedError`, and the job ran on to SUCCESS), and a pipeq job shares its
process, and its forward pass, with the others anyway. So a revoke goes through the
ledger's cancel (`pipeq._app.cancel_job`), with or without `terminate`: a job not
started never runs, a continuous-batching generation stops at its next step, and any
other job whose forward pass has begun runs to its end, which the reply says
(`{"error": ...}`) rather than claiming it revoked.

Importing this module replaces Celery's handler in the worker's process (Celery's
remote-control registry is one dict, `celery.worker.control.Panel.data`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.functional import maybe_list
from celery.worker.control import control_command, nok, ok

from pipeq._app import cancel_job

__all__ = ["revoke"]

log = logging.getLogger("pipeq.worker")

#: what a revoke did, or why it could not, by `cancel_job`'s outcome
_SAID = {
    "running": "not revoked: its forward pass has begun and cannot be stopped; it will finish",
    "unknown": "not revoked: pipeq never accepted this job (or its record expired)",
}


def _outcome(app: Any, job_id: str) -> str:
    """The job's state after a revoke, the same from every worker that receives it."""
    outcome = cancel_job(app, job_id, "revoked (Celery's revoke)")
    if outcome != "finished":
        return outcome
    # another worker's handler (or a producer) may have cancelled it a moment ago
    status = app.backend.get_state(job_id)
    if status == "REVOKED":
        return "cancelled"
    return f"finished ({status})"


@control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")  # type: ignore[untyped-decorator]
def revoke(
    state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
) -> dict[str, Any]:
    """Cancel jobs by id, as `Job.cancel()` does (`terminate` and `signal` change nothing)."""
    ids = [str(i) for i in maybe_list(task_id) or []]
    said = {}
    for job_id in ids:
        outcome = _outcome(state.app, job_id)
        if outcome == "cancelled":
            said[job_id] = "revoked"
        else:
            said[job_id] = _SAID.get(outcome, f"not revoked: it has {outcome}")
    log.info("revoke: %s", "; ".join(f"{i}: {w}" for i, w in said.items()))
    reply = ", ".join(f"{i}: {w}" for i, w in said.items())
    done = all(w == "revoked" for w in said.values())
    return dict(ok(reply) if done else nok(reply))
