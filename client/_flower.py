"""Flower's Celery app: `celery -A pipeq._flower flower`, as `pipeq up` runs it.

It is pipeq's own app (`_app.make_app`): the result backend, so Flower's
`/api/task/result/<id>` reads results, and pipeq's transport, whose enqueue goes
through the ledger, so a job sent from Flower counts in `Client.depth` like any other.
It reads the Redis URL from $PIPEQ_REDIS_URL only: a URL on a command line shows its
password in `ps`.

What Flower needs beyond that:

- `pipeq.run` is registered here, producer side, so `POST /api/task/async-apply/pipeq.run`
  finds it (`send-task` needs no registration). It never runs here.
- The queue says which deployment runs a job, as for every producer: a send must name
  `"queue": "pipeq.<deployment>"` of an announced deployment with a live worker. A send
  that does not (no queue, another queue, another task name, an unknown deployment) is
  refused: nothing is enqueued, and the job fails at once with the `PipeqError` that says
  why, which `send-task` answers as its state (FAILURE) and `/api/task/result/<id>`
  shows. Flower turns an exception raised by a send into a bare 500, so a refusal is
  told through the job instead. A deployment's `max_queue_length` holds as for `submit`.
- Revoke, Terminate and abort (`/api/task/revoke/<id>`, `/api/task/abort/<id>`) do what
  `Job.cancel()` does, or answer 409/404 saying why not (`route_revokes_through_cancel`).
- Flower's Broker page and `/api/queues/length` list the queues of the workers Flower
  inspected (once, at its start, and when a page asks it to refresh), else the app's
  `task_queues`: a deployment whose workers started later was missing, however many jobs
  waited for it. Here its pages list, at each request, the queues of every deployment
  announced in Redis, and of those in $PIPEQ_FLOWER_DEPLOYMENTS (set by `pipeq up`, so
  they are listed before their workers have loaded their models).
- A job has its row from the moment it is accepted (PENDING): pipeq's enqueue publishes
  Celery's `task-sent` event itself (`_app`).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import MutableMapping
from typing import Any

import redis
from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from pipeq import _app
from pipeq._ledger import PRIORITIES
from pipeq._registry import Announced, Registry
from pipeq._stack import FLOWER_DEPLOYMENTS_ENV, is_loopback
from pipeq.errors import InvalidRequest, PipeqError, UnknownDeployment

__all__ = ["FlowerApp", "app", "make_app", "route_revokes_through_cancel"]


class FlowerApp(Celery):  # type: ignore[misc]
    """pipeq's Celery app as Flower sends with it: every send is checked for a
    deployment to run it, and refused through the job when it has none."""

    #: deployments whose queues are listed whether or not a worker announced them yet
    configured: tuple[str, ...] = ()

    def deployment_queues(self) -> list[str]:
        """The queues of the configured deployments and of every one announced in Redis
        now (the configured ones only, when Redis does not answer), each level's
        (`_ledger` Priorities: `pipeq.<deployment>:high`, `...:low`) beside it."""
        try:
            announced = set(Registry(self.backend.client).deployments())
        except redis.RedisError:
            announced = set()
        names = announced | set(self.configured)
        return sorted(_app.queue_for(n, level) for n in names for level in PRIORITIES)

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        task_id = options.pop("task_id", None) or str(uuid.uuid4())
        try:
            deployment = self._deployment_of(name, options.get("queue"))
            _check_body(args, kwargs, options)
            limit = int(deployment.info.get("max_queue_length") or 0)
            options.setdefault("shadow", f"{_app.RUN_TASK}[{deployment.name}]")
            token = _app.enqueue_limit.set(limit)
            try:
                return super().send_task(name, args, kwargs, task_id=task_id, **options)
            except (ValueError, TypeError) as e:  # Celery's reading of an option
                raise InvalidRequest(f"Celery cannot send it: {e}") from None
            finally:
                _app.enqueue_limit.reset(token)
        except PipeqError as e:  # Overloaded comes from the enqueue itself
            self.backend.mark_as_failure(task_id, e)
            return self.AsyncResult(task_id)

    def _deployment_of(self, name: str, queue: Any) -> Announced:
        """The announced deployment whose queue this send names; a PipeqError if none."""
        registry = Registry(self.backend.client)
        known = registry.deployments()
        qname = getattr(queue, "name", queue)
        send = (
            f'send {{"kwargs": {{"inputs": ..., "params": {{...}}}}, "queue": '
            f'"{_app.QUEUE_PREFIX}<deployment>"}} to {_app.RUN_TASK}; '
            f"deployments: {', '.join(sorted(known)) or 'none yet'}"
        )
        if name != _app.RUN_TASK:
            raise InvalidRequest(f'pipeq workers run only {_app.RUN_TASK}, not "{name}": {send}')
        if not qname:
            raise InvalidRequest(f"no queue: {send}")
        found = None
        if isinstance(qname, str) and qname.startswith(_app.QUEUE_PREFIX):
            found = known.get(qname.removeprefix(_app.QUEUE_PREFIX))
        if found is None:
            raise UnknownDeployment(f'no deployment reads queue "{qname}": {send}')
        registry.require_live(found.name)
        return found


#: options a send may not carry: the queue alone routes a job (an exchange or routing key
#: sent it to another deployment than the one checked), and pipeq runs no delayed jobs
_REFUSED_OPTIONS = ("exchange", "routing_key", "countdown", "eta")


def _check_body(args: Any, kwargs: Any, options: dict[str, Any]) -> None:
    """InvalidRequest for what a worker would set aside: the send fails at once instead."""
    refused = sorted(o for o in _REFUSED_OPTIONS if options.get(o) not in (None, ""))
    if refused:
        raise InvalidRequest(f"pipeq routes by queue only and runs no delayed jobs: {refused}")
    if args:
        raise InvalidRequest('pass "kwargs": {"inputs": ..., "params": {...}}, not "args"')
    if not (
        isinstance(kwargs, dict)
        and "inputs" in kwargs
        and isinstance(kwargs.get("params"), dict)
        and set(kwargs) <= {"inputs", "params", "per_item"}
    ):
        raise InvalidRequest('kwargs must be {"inputs": ..., "params": {...}} ("params" may be {})')


def make_app(url: str | None = None, deployments: list[str] | None = None) -> Celery:
    """Flower's app on `url` (else $PIPEQ_REDIS_URL), whose pages list the queues of
    `deployments` (else $PIPEQ_FLOWER_DEPLOYMENTS) and of every deployment announced in
    Redis (`list_every_deployment`)."""
    url = _app.redis_url(url)
    if deployments is None:
        deployments = [d.strip() for d in os.environ.get(FLOWER_DEPLOYMENTS_ENV, "").split(",")]
    # Flower knows a broker by its URL's scheme, which kombu writes with the transport's
    # name: in Flower's process, pipeq's transport goes by the URL's own name ("redis")
    scheme = url.partition("://")[0]
    overrides = {}
    if scheme in ("redis", "rediss", "sentinel"):  # kombu's Redis transports, pipeq's extend
        TRANSPORT_ALIASES[scheme] = _app.transport_for(url)
        overrides["broker_transport"] = scheme
    flower = _app.make_app(url, cls=FlowerApp, **overrides)
    flower.configured = tuple(sorted(d for d in deployments if d))
    flower.task(name=_app.RUN_TASK, typing=False)(_never_here)
    # Flower reads results as AsyncResult(id), of the default app
    flower.set_default()
    flower.set_current()
    return flower


def _never_here(*args: Any, **kwargs: Any) -> None:
    """pipeq.run's producer side: pipeq workers run it, never Flower."""
    raise RuntimeError(f"{_app.RUN_TASK} runs on pipeq workers only")


#: Flower's answer to a revoke pipeq could not do, by `_app.cancel_job`'s outcome
_NOT_REVOKED = {
    "running": (409, "its forward pass has begun and cannot be stopped; it will finish"),
    "finished": (409, "it has finished"),
    "unknown": (404, "pipeq never accepted this job (or its record expired)"),
}


def route_revokes_through_cancel() -> None:
    """Flower's revoke (`/api/task/revoke/<id>`, with or without `?terminate=true`: its
    Revoke and Terminate buttons) and abort (`/api/task/abort/<id>`) do what
    `Job.cancel()` does: a job not started never runs, a continuous-batching generation
    stops at its next step. Flower answered 200 "Revoked" to any of them and broadcast
    Celery's revoke, whose terminate the workers' threads pool cannot do: the job ran on
    to SUCCESS. A job that cannot be stopped is refused: 409 (running, finished) or 404
    (unknown), with why. Flower builds its routes from `flower.urls.handlers` when it
    starts, after importing this app, so the two routes are replaced there."""
    try:
        from flower import urls
        from flower.api.control import ControlHandler
        from tornado import web
    except ImportError:  # not Flower's process (pipeq[stack] not installed)
        return

    class Revoke(ControlHandler):  # type: ignore[misc]
        @web.authenticated
        async def post(self, taskid: str) -> None:
            if self.application.options.read_only:
                raise web.HTTPError(403, "Read only mode is enabled")
            outcome = await self.run_blocking(
                "task.revoke", taskid, _app.cancel_job, self.capp, taskid, "revoked in Flower"
            )
            if outcome == "cancelled":
                self.write({"message": f"Revoked '{taskid}'"})
                return
            status, why = _NOT_REVOKED.get(outcome, (409, outcome))
            self.set_status(status)
            self.write({"message": f"Not revoked '{taskid}': {why}"})

    routes = ("/api/task/revoke/(.+)", "/api/task/abort/(.+)")
    urls.handlers[:] = [
        (h[0], Revoke) if isinstance(h, tuple) and h[0] in routes else h for h in urls.handlers
    ]


def list_every_deployment() -> None:
    """Flower's pages list the queues of its inspected workers (else the app's default
    queue and `task_queues`), and also, on pipeq's app, every deployment's queue now
    (`FlowerApp.deployment_queues`). Its default queue, which nobody reads (a send
    without a deployment's queue is refused), is left out."""
    try:
        from flower.views import BaseHandler
    except ImportError:  # a producer-only install: no Flower to configure
        return
    flowers_own = BaseHandler.get_active_queue_names
    if getattr(flowers_own, "pipeq", False):
        return

    def get_active_queue_names(handler: Any) -> list[str]:
        app = handler.capp
        names = set(flowers_own(handler)) - {app.conf.task_default_queue}
        if isinstance(app, FlowerApp):
            names.update(app.deployment_queues())
        return sorted(names)

    get_active_queue_names.pipeq = True  # type: ignore[attr-defined]
    BaseHandler.get_active_queue_names = get_active_queue_names


def guard_exposure(argv: list[str], env: MutableMapping[str, str]) -> None:
    """Flower shows every job's input and result on its pages, and its own default is
    every interface: without a password (FLOWER_BASIC_AUTH, or OAuth's FLOWER_AUTH) it
    listens on 127.0.0.1 only, its API open there as under `pipeq up`, and an `--address`
    beyond this host is refused (SystemExit with one line), as `pipeq up` refuses it."""
    if env.get("FLOWER_BASIC_AUTH", "").strip() or env.get("FLOWER_AUTH", "").strip():
        return
    address = env.get("FLOWER_ADDRESS")
    for i, arg in enumerate(argv):
        if arg.startswith("--address="):
            address = arg.partition("=")[2]
        elif arg == "--address" and i + 1 < len(argv):
            address = argv[i + 1]
    if address is None:
        env["FLOWER_ADDRESS"] = "127.0.0.1"  # read by Flower as its --address default
    elif not is_loopback(address):
        raise SystemExit(
            f"pipeq Flower: no password for address {address or 'every address'!r}: set "
            "FLOWER_BASIC_AUTH=user:password (PIPEQ_FLOWER_AUTH under pipeq up)"
        )
    # this host only: its API open, as under `pipeq up` (Flower answers 401 otherwise)
    env.setdefault("FLOWER_UNAUTHENTICATED_API", "true")


guard_exposure(sys.argv, os.environ)
route_revokes_through_cancel()
list_every_deployment()
app = make_app()
