"""The `pipeq` command. Options fall back to $PIPEQ_REDIS_URL and $PIPEQ_CONFIG."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeq.errors import PipeqError

__all__ = ["main"]


def _param(text: str) -> tuple[str, Any]:
    """key=value, the value read as JSON when it parses (2, true, [..]) else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"seconds must be positive and finite, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {text!r}")
    return value


def _input(text: str) -> Any:
    """A plain string, or JSON when it starts like JSON (for lists and QA dicts)."""
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _missing_worker_extra(command: str) -> bool:
    """True (after saying what to install) when the worker extra is not installed."""
    import importlib.util

    missing = []
    for module in ("torch", "transformers"):
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ImportError:  # a parent package cannot be imported, or a finder refuses
            missing.append(module)
    if missing:
        print(
            f"pipeq {command}: {' and '.join(missing)} not installed: this is a producer-only "
            "install; workers need: pip install 'pipeq[worker]'",
            file=sys.stderr,
        )
    return bool(missing)


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeq._config import load_deployments, pick

    if _missing_worker_extra("worker"):
        return 2
    if args.health_file:  # found unwritable now, not after minutes of model loading
        try:
            Path(args.health_file).touch()
            Path(args.health_file).unlink()
        except OSError as e:
            print(f"pipeq worker: --health-file {args.health_file}: {e.strerror}", file=sys.stderr)
            return 2

    deployment = pick(load_deployments(args.config), args.deployment)
    from pipeq.worker.liveness import LivenessSettings
    from pipeq.worker.main import run_worker  # torch lives behind this import

    try:
        liveness = LivenessSettings(
            heartbeat_s=args.heartbeat_s,
            dead_after_s=args.dead_after_s,
            max_attempts=args.max_attempts,
            health_file=args.health_file,
        )
    except ValueError as e:
        print(f"pipeq worker: {e}", file=sys.stderr)
        return 2
    return run_worker(
        deployment,
        # a deployment that names its own Redis uses it (docs/redis.md, several Redis)
        redis_url=deployment.redis_url or args.redis_url,
        gpu=args.gpu,
        concurrency=args.concurrency,
        loglevel=args.loglevel,
        liveness=liveness,
    )


def _up_config(args: argparse.Namespace) -> str | None:
    """The config `pipeq up` serves: --config, or with --tiny the offline tiny models'."""
    if not args.tiny:
        return args.config  # type: ignore[no-any-return]
    from pipeq.worker.demo import demo_config, write_config

    models = Path(args.models_dir)
    print(f"tiny:    offline models in {models}", flush=True)
    return str(write_config(demo_config(models), models / "tiny.toml"))


def _serving(stack: Any, args: argparse.Namespace, stopping: threading.Event) -> bool:
    """Wait for the workers and say how each started; False when none serves (or a stop
    was asked for meanwhile). Raises redis.RedisError when Redis does not answer."""
    ready = stack.wait_ready(args.ready_timeout, stopping)
    if stopping.is_set():
        return False
    for name, state in ready.items():
        print(f"worker {name}: {state}", flush=True)
    failed = sorted(n for n, state in ready.items() if state != "ready")
    if failed and len(failed) == len(ready):
        hint = (
            "" if args.tiny else " (no Hugging Face Hub? `pipeq up --tiny` serves offline models)"
        )
        print(f"pipeq up: every worker failed{hint}", file=sys.stderr, flush=True)
        return False
    if failed:
        names = ", ".join(failed)
        print(f"{len(failed)} of {len(ready)} workers failed ({names}); serving the others")
    return True


def cmd_up(args: argparse.Namespace) -> int:
    """Exit 0 after Ctrl-C/SIGTERM; 1 when every worker failed; 2 when the stack cannot
    start (a port taken, Flower exposed without a password, Redis not answering)."""
    import redis

    from pipeq._config import load_deployments
    from pipeq._redis import masked, scrub
    from pipeq._stack import FLOWER_AUTH_ENV, MAX_RESTARTS, FlowerUnprotected, Stack

    if _missing_worker_extra("up"):
        return 2
    if os.environ.get("PIPEQ_REDIS_URL") and not args.redis_url:
        print(
            "pipeq up: $PIPEQ_REDIS_URL is ignored; an embedded Redis is started "
            "(--redis-url joins another)",
            file=sys.stderr,
        )
    config = _up_config(args)
    deployments = load_deployments(config)
    elsewhere = sorted(n for n, d in deployments.items() if d.redis_url)
    if elsewhere:
        print(
            f"pipeq up: {', '.join(elsewhere)} name their own redis_url; pipeq up runs one "
            "Redis: start those workers with `pipeq worker` (docs/redis.md, several Redis)",
            file=sys.stderr,
        )
        return 2
    stack = Stack(
        deployments,
        config,
        redis_url=args.redis_url or None,
        redis_port=args.redis_port,
        flower_port=None if args.no_flower else args.flower_port,
        flower_address=args.flower_address,
        flower_auth=os.environ.get(FLOWER_AUTH_ENV) or None,
        exporter_port=None if args.no_exporter else args.exporter_port,
        gateway_port=None if args.no_gateway else args.gateway_port,
        max_restarts=args.max_restarts or MAX_RESTARTS,
    )
    try:
        stack.check()  # before anything starts: nothing to stop
    except FlowerUnprotected as e:
        print(f"pipeq up: {e}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    try:
        stack.start()
        where = masked(stack.url) + ("  (embedded)" if stack.redis_proc else "")
        print(f"redis:   {where}", flush=True)
        if stack.flower_proc:
            api = "basic auth" if stack.flower_auth else "API open to this host"
            print(f"flower:  {stack.flower_url}  ({api})", flush=True)
        if stack.exporter_proc:
            print(f"metrics: {stack.metrics_url}", flush=True)
        if stack.gateway_proc:
            print(f"gateway: {stack.gateway_url}  (HTTP API, this host only)", flush=True)
        print(f"logs:    {stack.log_dir}", flush=True)
        if not _serving(stack, args, stopping):
            return 0 if stopping.is_set() else 1
        print("pipeq is up; Ctrl-C stops it", flush=True)
        told = {n for n in stack.failed() if n in stack.workers}  # said by _serving
        reported = set(told)
        while True:
            for line in stack.supervise(told):  # restarts the workers that exited
                print(line, flush=True)
            told = set()
            for name, code in stack.failed().items():  # Flower, the exporter
                if name not in reported and name not in stack.workers:
                    reported.add(name)
                    print(f"{name} exited ({code}): {stack.log_tail(name)}", flush=True)
            if stopping.wait(1.0):
                break
    except RuntimeError as e:  # a port taken, no redis-server
        print(f"pipeq up: {e}", file=sys.stderr)
        return 2
    except redis.RedisError as e:
        why = scrub(str(e), stack.url)  # a server may echo what it was sent
        print(f"pipeq up: Redis at {masked(stack.url)} does not answer: {why}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(OSError):  # stdout closed (`pipeq up | head`): stop anyway
            print("stopping...", flush=True)
        stack.stop()
    return 0


def _client(args: argparse.Namespace) -> Any:
    from pipeq import Client

    # a config's deployments that name their own Redis are found there ($PIPEQ_CONFIG)
    return Client(args.redis_url, config=getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit(args.target, _input(args.input), model=args.model, **dict(args.param))
        if args.stream:  # the text as it is made, then a line break; Ctrl-C cancels the job
            try:
                for piece in job.stream(timeout=args.timeout):
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                job.cancel()
                print("\npipeq: cancelled", file=sys.stderr)
                return 130
            print()
            return 0
        _print(job.result(timeout=args.timeout))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit(args.target, _input(args.input), model=args.model, **dict(args.param))
        print(job.id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeq import JobState

    if args.job_id is None:
        return _cluster_status(args)
    with _client(args) as client:
        state = client.job(args.job_id).status()
    print(state.value)
    return 1 if state is JobState.UNKNOWN else 0


def _cluster_status(args: argparse.Namespace) -> int:
    """One line per deployment; exit 1 when one of them needs a live worker and has none
    (or none is known), or Redis refuses writes (said in a last line), 2 when Redis cannot
    be read (BrokerUnavailable). With --watch,
    until Ctrl-C, through Redis outages."""
    import time

    declared = {}
    if args.config:
        from pipeq._config import load_deployments

        declared = {n: (d.task, d.model) for n, d in load_deployments(args.config).items()}
    with _client(args) as client:
        while True:
            if args.watch:
                print("\033[H\033[2J", end="")  # clear the terminal, as watch(1) does
            try:
                code = _status_once(client, args, declared)
            except PipeqError as e:  # BrokerUnavailable
                if not args.watch:
                    raise
                print(f"pipeq: {type(e).__name__}: {e}; trying again", file=sys.stderr)
                code = 2
            if not args.watch:
                return code
            sys.stdout.flush()
            time.sleep(args.watch)


def _status_once(client: Any, args: argparse.Namespace, declared: dict[str, Any]) -> int:
    """One reading of every Redis the client knows; exit 2 when one of several does not
    answer (its deployments named), and raises BrokerUnavailable when the only one
    does not."""
    from pipeq import _status
    from pipeq._redis import masked

    found, down, refusals = [], [], []
    for url in client.redis_urls:
        broker = client.broker_at(url)
        here = {n: v for n, v in declared.items() if client.broker(n) is broker}
        try:
            got = broker.call(_status.cluster_status, broker.redis, here)
            refusal = broker.call(_status.write_refusal_of, broker.redis)
        except PipeqError as e:  # BrokerUnavailable
            if len(client.redis_urls) == 1:
                raise
            names = sorted(n for n in {*client.config, *declared} if client.broker(n) is broker)
            down.append((masked(url), names, f"{type(e).__name__}: {e}"))
            continue
        found += [d for d in got if client.broker(d.name) is broker]
        if refusal is not None:
            refusals.append((masked(url), refusal))
    found.sort(key=lambda d: d.name)
    if args.deployment:
        missing = sorted(set(args.deployment) - {d.name for d in found})
        found = [d for d in found if d.name in args.deployment]
    else:
        missing = [] if found or down else ["(none announced on this Redis)"]
    unreachable = {n for _, names, _ in down for n in names}
    missing = [n for n in missing if n not in unreachable]
    several = len(client.redis_urls) > 1
    if args.json:
        lines = [
            _status.status_json(
                found, missing, refusals[0][1] if refusals else None, down if several else None
            )
        ]
    else:
        lines = _status.status_lines(found)
        lines += [
            (f"{where}: " if several else "") + _status.refusal_line(reason)
            for where, reason in refusals
        ]
        lines += [
            f"Redis at {where} does not answer; its deployments: {', '.join(names) or '?'}"
            for where, names, _ in down
        ]
    print("\n".join(lines))
    downs = [d.name for d in found if d.down]
    for what, names in (("no live worker", downs), ("no such deployment", missing)):
        if names:
            print(f"{what}: {', '.join(names)}", file=sys.stderr)
    for _, _, why in down:
        print(f"pipeq: {why}", file=sys.stderr)
    return 2 if down else 1 if downs or missing or refusals else 0


def _redis_urls(config: str | None) -> list[str]:
    """The distinct Redis URLs a config's deployments name of their own (`redis_url`)."""
    from pipeq._config import load_deployments, redis_routes

    return list(dict.fromkeys(redis_routes(load_deployments(config)).values())) if config else []


def cmd_exporter(args: argparse.Namespace) -> int:
    from pipeq import _app, _status
    from pipeq._redis import masked

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    url = _app.redis_url(args.redis_url)
    try:
        urls = [url] + [u for u in _redis_urls(args.config) if u != url]
        server, _ = _status.serve_exporter(urls, args.port, args.address)
    except OSError as e:
        print(f"pipeq exporter: cannot listen on {args.address}:{args.port}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # not a Redis URL of `_redis`'s forms
        print(f"pipeq exporter: invalid Redis URL {masked(url)}: {e}", file=sys.stderr)
        return 2
    host = f"[{args.address}]" if ":" in args.address else args.address  # IPv6
    print(f"metrics: http://{host}:{args.port}/metrics", flush=True)
    stopping.wait()
    server.shutdown()
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    from pipeq import JobState

    with _client(args) as client:
        job = client.job(args.job_id)
        if job.status() is JobState.UNKNOWN:
            print("unknown job: pipeq never accepted this id (or it expired)", file=sys.stderr)
            return 1
        _print(job.result(timeout=args.timeout))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from pipeq import JobState

    with _client(args) as client:
        job = client.job(args.job_id)
        if job.cancel():
            print("cancelled")
            return 0
        state = job.status()
    print(
        {
            JobState.UNKNOWN: "unknown job: pipeq never accepted this id (or it expired)",
            JobState.RUNNING: "not cancelled: it is running and will finish",
        }.get(state, f"not cancelled: it has finished ({state.value})"),
        file=sys.stderr,
    )
    return 1


def cmd_deployments(args: argparse.Namespace) -> int:
    from pipeq._status import waiting_shown

    with _client(args) as client:
        if args.forget:
            if args.forget not in client.deployments():
                print(f"pipeq: no deployment {args.forget!r} announced here", file=sys.stderr)
                return 1
            at = client.broker(args.forget)  # its Redis (docs/redis.md, several Redis)
            at.call(at.registry.forget, args.forget)
            print(f"forgot {args.forget}")
            return 0
        for name, d in sorted(client.deployments().items()):
            at = client.broker(name)
            live = len(at.call(at.registry.live_workers, name))
            depth = client.depth(name)
            waiting = waiting_shown(depth.waiting, depth.levels)
            print(
                f"{name}\t{d.task}\t{d.model}\t{live} live worker(s)\t{waiting} waiting"
                f" (oldest {depth.oldest_age_s:.1f} s)\t{depth.running} running"
            )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Exit 2 when it cannot start: no `pipeq[serve]`, keys unusable, a non-loopback
    address without keys."""
    try:
        from pipeq.serve._run import Unprotected, key_stanza, serve, settings_from
    except ImportError as e:
        print(
            f"pipeq serve needs the serve extra (pip install 'pipeq[serve]'): {e}", file=sys.stderr
        )
        return 2
    if args.new_webhook_secret:
        from pipeq.serve._webhooks import new_secret

        print(new_secret())
        return 0
    if args.new_key:
        key, stanza = key_stanza(args.new_key, args.deployments or [])
        # the key on stderr, shown once; the entry (its hash only) on stdout, for the file
        print(
            f"API key {args.new_key} (give it to its user; it is not kept): {key}", file=sys.stderr
        )
        print(stanza, end="")
        return 0
    try:
        settings = settings_from(
            args.redis_url, args.keys, args.max_body_bytes, args.webhooks, args.config
        )
        settings.keepalive_s = args.keepalive_s
        serve(settings, args.address, args.port, args.log_level)
    except (ValueError, Unprotected) as e:
        print(f"pipeq serve: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeq.worker.demo import main as demo_main

    return demo_main(models_dir=args.models_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    env_url = os.environ.get("PIPEQ_REDIS_URL")
    env_config = os.environ.get("PIPEQ_CONFIG")

    def add(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument(
            "--redis-url",
            default=env_url,
            help="default: $PIPEQ_REDIS_URL or redis://127.0.0.1:6399/0",
        )
        return sp

    w = add("worker", "serve one deployment (one model on one device)", cmd_worker)
    w.add_argument("deployment", help="deployment name (or a task served by one)")
    w.add_argument(
        "--config", default=env_config, help="deployments TOML (default: the course's nine)"
    )
    w.add_argument("--gpu", type=int, help="use only this GPU (sets CUDA_VISIBLE_DEVICES)")
    w.add_argument(
        "--concurrency",
        type=int,
        help="jobs held at once (default 5 x max_batch_size: 4 batches of any priority, "
        "and what is past 4 batches for high-priority jobs only)",
    )
    w.add_argument("--loglevel", default="INFO")
    w.add_argument(
        "--heartbeat-s",
        type=_seconds,
        default=os.environ.get("PIPEQ_HEARTBEAT_S", "2"),
        help="seconds between heartbeats ($PIPEQ_HEARTBEAT_S, default 2)",
    )
    w.add_argument(
        "--dead-after-s",
        type=_seconds,
        default=os.environ.get("PIPEQ_DEAD_AFTER_S", "10"),
        help="a worker silent this long is dead; its jobs go back ($PIPEQ_DEAD_AFTER_S, 10)",
    )
    w.add_argument(
        "--max-attempts",
        type=_count,
        default=os.environ.get("PIPEQ_MAX_ATTEMPTS", "3"),
        help="a job whose worker died running it this often fails with JobLost "
        "($PIPEQ_MAX_ATTEMPTS, 3)",
    )
    w.add_argument(
        "--health-file",
        default=os.environ.get("PIPEQ_HEALTH_FILE") or None,
        metavar="PATH",
        help="touched at each heartbeat once the model has loaded, removed at stop: healthy "
        "while younger than --dead-after-s ($PIPEQ_HEALTH_FILE)",
    )

    u = add("up", "start Redis (embedded unless --redis-url), the workers and Flower", cmd_up)
    # $PIPEQ_REDIS_URL names the cluster producers use: a local stack (tiny models, say)
    # must not join it unless asked to
    u.set_defaults(redis_url=None)
    u.add_argument("--config", default=env_config)
    u.add_argument(
        "--tiny",
        action="store_true",
        help="serve the course's tasks with tiny random-weight models built offline "
        "(what `pipeq demo` uses; no Hugging Face Hub needed)",
    )
    u.add_argument("--models-dir", default=".cache/pipeq-models", help="where --tiny builds them")
    u.add_argument("--redis-port", type=_port, default=6399, help="port of the embedded Redis")
    u.add_argument("--flower-port", type=_port, default=5555)
    u.add_argument(
        "--flower-address",
        default="127.0.0.1",
        help="address Flower listens on (default 127.0.0.1); any other than loopback "
        "needs $PIPEQ_FLOWER_AUTH=user:password",
    )
    u.add_argument("--no-flower", action="store_true")
    u.add_argument(
        "--exporter-port", type=_port, default=9808, help="Prometheus metrics on 127.0.0.1"
    )
    u.add_argument("--no-exporter", action="store_true")
    u.add_argument(
        "--gateway-port",
        type=_port,
        default=8000,
        help="the HTTP gateway (pipeq serve) on 127.0.0.1, with pipeq[serve]",
    )
    u.add_argument("--no-gateway", action="store_true")
    u.add_argument("--ready-timeout", type=float, default=300.0)
    u.add_argument(
        "--max-restarts",
        type=_count,
        help="a worker that exits on its own is restarted (after 1, 2, 4 ... s); after this "
        "many restarts in a row, each within a minute of its start, pipeq up gives up on "
        "it (default 5). Exit 2 and 3 (config, model) are not restarted",
    )

    for name, func, help in (
        ("run", cmd_run, "submit one request, wait, print the result as JSON"),
        ("submit", cmd_submit, "submit one request and print its job id"),
    ):
        sp = add(name, help, func)
        sp.add_argument("target", help="deployment name or task")
        sp.add_argument("input", help="the text (JSON for lists or question-answering dicts)")
        sp.add_argument("--model", help="pick the deployment of the task serving this model")
        sp.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE")
        if name == "run":
            sp.add_argument("--timeout", type=_seconds, default=None)
            sp.add_argument(
                "--stream",
                action="store_true",
                help="text-generation: print the text as it is generated, not the JSON result",
            )

    s = add(
        "status",
        "without a job id: one line per deployment (exit 1 when one has no live worker); "
        "with one: that job's state (exit 1 for an id pipeq never accepted)",
        cmd_status,
    )
    s.add_argument("job_id", nargs="?")
    s.add_argument("--json", action="store_true", help="the deployments as JSON, for scripts")
    s.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    s.add_argument(
        "--config",
        default=env_config,
        help="deployments TOML: its deployments count even if no worker announced them",
    )
    s.add_argument(
        "--deployment",
        action="append",
        metavar="NAME",
        help="only this deployment (repeatable): a worker's health check",
    )
    e = add("exporter", "serve Prometheus metrics of every deployment on this Redis", cmd_exporter)
    e.add_argument("--port", type=_port, default=9808)
    e.add_argument(
        "--config",
        default=env_config,
        help="deployments TOML: the Redis servers its deployments name are read too",
    )
    e.add_argument(
        "--address", default="0.0.0.0", help="address to bind (default all: Prometheus scrapes it)"
    )
    r = add("result", "wait for a job's result and print it", cmd_result)
    r.add_argument("job_id")
    r.add_argument("--timeout", type=_seconds, default=None)
    c = add("cancel", "cancel a job that has not started (exit 1 if it could not be)", cmd_cancel)
    c.add_argument("job_id")
    dp = add(
        "deployments",
        "list the deployments workers announced, with live workers and queue depth",
        cmd_deployments,
    )
    dp.add_argument(
        "--forget",
        metavar="NAME",
        help="retire a deployment no worker serves and no job needs (status, exporter, alerts)",
    )
    sv = add("serve", "an HTTP gateway: jobs over HTTP, with API keys (docs/http.md)", cmd_serve)
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument(
        "--config",
        default=env_config,
        help="deployments TOML: those naming their own redis_url are served on that Redis",
    )
    sv.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1); any other needs API keys (--keys)",
    )
    sv.add_argument(
        "--keys",
        default=os.environ.get("PIPEQ_API_KEYS_FILE"),
        metavar="FILE",
        help="the API keys, hashed, as TOML ($PIPEQ_API_KEYS_FILE, or the TOML in "
        "$PIPEQ_API_KEYS); none: loopback only",
    )
    sv.add_argument(
        "--max-body-bytes",
        type=_count,
        default=None,
        help="refuse bodies over this (413); default: the largest limits.request_bytes + 64 KiB",
    )
    sv.add_argument(
        "--keepalive-s",
        type=_seconds,
        default=15.0,
        help="an event stream sends a comment this often while nothing else comes (default 15)",
    )
    sv.add_argument(
        "--webhooks",
        default=os.environ.get("PIPEQ_WEBHOOKS_FILE"),
        metavar="FILE",
        help="webhooks' secrets, allowlist and retries, as TOML ($PIPEQ_WEBHOOKS_FILE, or the "
        "TOML in $PIPEQ_WEBHOOKS); none: a job naming a webhook is refused",
    )
    sv.add_argument(
        "--new-webhook-secret",
        action="store_true",
        help="print a new webhook signing secret (whsec_...) for the webhooks file, then exit",
    )
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sv.add_argument(
        "--new-key",
        metavar="NAME",
        help="print a new API key and its entry for the keys file, then exit",
    )
    sv.add_argument(
        "--deployments",
        type=lambda text: [d.strip() for d in text.split(",") if d.strip()],
        help="with --new-key: the deployments it may use, comma-separated (default: all)",
    )
    d = add(
        "demo", "run the course's chapter 1 on a local stack with tiny offline models", cmd_demo
    )
    d.add_argument("--models-dir", default=".cache/pipeq-models")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, in the worker package (it needs transformers)
        from pipeq.worker.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `pipeq ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except PipeqError as e:
        print(f"pipeq: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
