"""One worker across several ranks: a deployment's `tensor_parallel = N`.

`pipeq worker` is rank 0: before it loads the model it starts N - 1 follower processes
(`python -m pipeq.worker.tensor_parallel`, fresh interpreters: nothing forks), and all N
join one torch.distributed group (gloo on the CPU, NCCL on GPUs, rank r on cuda:r) and
load the model with `tp_plan="auto"`, each holding its shard. Rank 0 alone is the
Celery consumer, the heartbeat and the continuous-batching driver; the followers only
run the model, in lockstep with it:

- transformers' `ContinuousBatchingManager` runs tensor-parallel by itself: every rank
  runs a manager, rank 0's takes the requests and hands them, and its cancellations, to
  the others at each step (`generation/continuous_batching/distributed.py`). What pipeq
  adds to the step (`decoding.DrawStep`: each row's processors and draw) runs on rank 0,
  whose scores the others receive (one broadcast a step), so every rank picks the same
  token;
- whatever else runs the model on rank 0 (a dynamic batch; a new manager after a failed
  step) is a command (`Group.command`) that rank 0 sends to the followers over a gloo
  group of their own before it runs it, and that they run too, with the same random
  seed. A dynamic batch runs while the managers of all ranks are paused (transformers'
  `pause()` must be entered on every rank).

No half-alive group: rank 0 watches its followers (`Group.check`, every `WATCH_S`) and
exits at once (EXIT_UNHEALTHY; a follower that failed to load its model:
EXIT_MODEL_LOAD_FAILED) when one of them ends, or when a command or a batch meets a failed
collective (before any job is failed with that error), so it stops beating and the other
workers take its jobs back after `dead_after_s`, as with any dead worker; a follower exits
when rank 0 is gone (its parent changes) or a collective with it fails. A job's
`max_time` (a wall-clock limit, which ranks would reach at different steps) is refused on
such a worker.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from pipeq._config import Deployment
from pipeq.errors import InvalidRequest

log = logging.getLogger("pipeq.worker")
T = TypeVar("T")

__all__ = ["COLLECTIVE_TIMEOUT_S", "WATCH_S", "Group", "launch"]

#: how often rank 0 looks at its followers, and a follower at its parent (seconds)
WATCH_S = 0.1
#: a collective (the group's start, a command) waits this long for the other ranks
COLLECTIVE_TIMEOUT_S = 600.0
#: the environment a follower reads its place from
ENV_DEPLOYMENT = "PIPEQ_TP_DEPLOYMENT"
ENV_PARENT = "PIPEQ_TP_PARENT"


def _backend(deployment: Deployment) -> str:
    return "nccl" if deployment.device.startswith("cuda") else "gloo"


def _init_group(deployment: Deployment, rank: int, port: int) -> None:
    """Join the deployment's process group as `rank` (rank 0 hosts its store)."""
    import torch
    import torch.distributed as dist

    world = deployment.tensor_parallel
    # transformers binds rank r to its device from LOCAL_RANK (tp_plan="auto")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if deployment.device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(
        _backend(deployment),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def _commands_group() -> Any:
    """The gloo group rank 0 sends commands on (every rank creates it, in the same order)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _receive(group: Any) -> tuple[Any, ...]:
    import torch.distributed as dist

    holder: list[Any] = [None]
    dist.broadcast_object_list(holder, src=0, group=group)
    return tuple(holder[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Group:
    """Rank 0's side of a tensor-parallel worker: its followers, the commands it sends
    them, and the watch that ends rank 0 when one of them ends."""

    def __init__(self, deployment: Deployment, followers: list[subprocess.Popen[bytes]]) -> None:
        self.deployment = deployment
        self.followers = followers
        self.commands: Any = None  # the gloo group, once the model has loaded
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._run_watch, name="pipeq-tp-watch", daemon=True)
        self._watch.start()
        atexit.register(self.kill)

    def _run_watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            self.check()

    def check(self) -> None:
        """Exit at once when a follower has ended (unless the group is stopping)."""
        for rank, proc in enumerate(self.followers, start=1):
            code = proc.poll()
            if code is not None and not self._stopping.is_set():
                self.broken(f"rank {rank} (pid {proc.pid}) ended (exit status {code})", code)

    def broken(self, why: str, code: int | None = None) -> NoReturn:
        """The group cannot run its model: exit now, storing nothing more, so that the
        jobs this worker holds go back to the queue (EXIT_UNHEALTHY; EXIT_MODEL_LOAD_FAILED
        when a follower could not load the model)."""
        from pipeq.worker.liveness import EXIT_UNHEALTHY
        from pipeq.worker.main import EXIT_MODEL_LOAD_FAILED

        log.critical(
            "tensor parallel: %s: the group cannot run its model; exiting so that its "
            "jobs are taken back",
            why,
        )
        self.kill()
        logging.shutdown()
        os._exit(EXIT_MODEL_LOAD_FAILED if code == EXIT_MODEL_LOAD_FAILED else EXIT_UNHEALTHY)

    def _failed(self, e: BaseException) -> None:
        """After an error in a collective's path: exit if it was the group's (a follower
        gone, a connection lost), rather than fail the batch's jobs with it; else return
        (the jobs' own error, which every rank met)."""
        self.check()
        if (
            not self._stopping.is_set()
            and isinstance(e, RuntimeError)
            and (type(e).__name__ == "DistBackendError" or "gloo" in str(e) or "NCCL" in str(e))
        ):
            self.broken(f"a collective failed: {e}")

    def joined(self) -> None:
        """The model has loaded on every rank: open the commands' channel."""
        self.commands = _commands_group()

    def command(self, *cmd: Any) -> None:
        """Have every follower run `cmd` (they take commands one at a time, in order)."""
        import torch.distributed as dist

        with self._lock:
            try:
                dist.broadcast_object_list([list(cmd)], src=0, group=self.commands)
            except Exception as e:
                if self._stopping.is_set():  # the group is going anyway: stop() says so
                    raise
                self._failed(e)
                self.broken(f"the followers did not take a command: {e}")

    def manager(self, start: Callable[[], T]) -> Callable[[], T]:
        """`start` (a new continuous-batching manager), with every follower starting its own:
        the managers' creation is collective."""

        def started() -> T:
            self.command("manager")
            return start()

        return started

    def mirrored(
        self, run: Callable[..., T], lock: contextlib.AbstractContextManager[Any] | None = None
    ) -> Callable[..., T]:
        """`run(items, params, time_limit_s=...)` (a dynamic batch) on every rank, after
        the same random seed. Under `lock` (the manager slot's: no restart in between),
        the followers are told before `run` pauses rank 0's manager: every rank's manager
        must enter the pause, or the group's loops wait for each other for ever."""

        def run_everywhere(items: list[Any], params: dict[str, Any], **_: Any) -> T:
            import torch

            if "max_time" in params:
                raise InvalidRequest(
                    "max_time cannot be used on a tensor-parallel deployment: its ranks "
                    "would stop at different steps (job_timeout_s bounds the job)"
                )
            seed = random.getrandbits(63)
            with lock or contextlib.nullcontext():
                self.command("run", items, params, seed)
                # nothing draws from torch's global generator on rank 0 until `run` (the
                # manager decodes greedily; a row's draw has a generator of its own)
                torch.manual_seed(seed)
                try:
                    # no wall-clock limit inside the batch, which ranks would reach at
                    # different steps: job_timeout_s still ends the job's wait
                    return run(items, params, time_limit_s=None)
                except Exception as e:  # a follower's death fails no job: it exits here
                    self._failed(e)
                    raise

        return run_everywhere

    def stop(self) -> None:
        """Tell the followers to exit, and wait for them (killed after a grace)."""
        self._stopping.set()
        if self.commands is not None:
            try:
                self.command("stop")
            except Exception as e:  # a follower already gone: kill() below
                log.warning("could not tell the tensor-parallel ranks to stop: %s", e)
        deadline = time.monotonic() + 10
        for proc in self.followers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        self._stopping.set()
        for proc in self.followers:
            if proc.poll() is None:
                proc.kill()


def launch(deployment: Deployment, loglevel: str) -> Group:
    """Rank 0: start the followers and join the group with them (the model loads next)."""
    port = _free_port()
    env = {
        **os.environ,
        ENV_DEPLOYMENT: json.dumps(deployment.to_dict()),
        ENV_PARENT: str(os.getpid()),
    }
    followers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeq.worker.tensor_parallel",
                str(rank),
                str(port),
                loglevel,
            ],
            env=env,
        )
        for rank in range(1, deployment.tensor_parallel)
    ]
    group = Group(deployment, followers)  # watching them from here: one may fail to start
    log.info(
        "tensor parallel: %d ranks (%s), followers %s",
        deployment.tensor_parallel,
        _backend(deployment),
        [p.pid for p in followers],
    )
    _init_group(deployment, 0, port)
    return group


def _watch_parent(parent: int) -> None:
    from pipeq.worker.liveness import EXIT_UNHEALTHY

    while True:
        time.sleep(WATCH_S)
        if os.getppid() != parent:
            log.critical("tensor-parallel rank 0 (pid %d) is gone: exiting", parent)
            logging.shutdown()
            os._exit(EXIT_UNHEALTHY)


def follow(rank: int, port: int, loglevel: str) -> int:
    """A follower: load its shard, then run what rank 0 sends until it says stop."""
    from pipeq.worker.liveness import EXIT_UNHEALTHY

    logging.basicConfig(
        level=loglevel, format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s"
    )
    parent = int(os.environ[ENV_PARENT])
    if os.getppid() != parent:
        return EXIT_UNHEALTHY
    threading.Thread(
        target=_watch_parent, args=(parent,), name="pipeq-tp-parent", daemon=True
    ).start()
    # rank 0 stops with SIGTERM; a follower stops when rank 0 says so, or with it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    deployment = Deployment(**json.loads(os.environ[ENV_DEPLOYMENT]))

    from pipeq.errors import ModelLoadError
    from pipeq.worker import placement
    from pipeq.worker.generation import start_manager

    _init_group(deployment, rank, port)
    try:
        handler = placement.load(deployment)
    except ModelLoadError as e:
        from pipeq.worker.main import EXIT_MODEL_LOAD_FAILED

        print(f"pipeq worker {deployment.name} rank {rank}: {e.message}", file=sys.stderr)
        return EXIT_MODEL_LOAD_FAILED
    commands = _commands_group()
    log.info("loaded its shard of %s; following rank 0", deployment.model)
    manager: Any = None
    while True:
        try:
            cmd = _receive(commands)
        except Exception as e:  # rank 0 is gone
            log.critical("lost rank 0: %s", e)
            return EXIT_UNHEALTHY
        if cmd[0] == "stop":
            break
        if cmd[0] == "manager":
            if manager is not None and manager.is_running():
                # rank 0's loop ended on an error: it told the group (transformers'
                # HARD_STOP), unless a BaseException ended it, which leaves this loop
                # waiting for it in a collective: the group cannot go on
                manager.stop(block=True, timeout=10)
                if manager.is_running():
                    log.critical("this rank's generation loop does not stop: exiting")
                    return EXIT_UNHEALTHY
            manager = start_manager(handler.pipe, deployment.max_batch_size)
        elif cmd[0] == "run":
            _, items, params, seed = cmd
            _run_paused(manager, handler, items, params, seed)
    if manager is not None and manager.is_running():
        manager.stop(block=True, timeout=10)
    return 0


def _run_paused(manager: Any, handler: Any, items: Any, params: Any, seed: int) -> None:
    """What rank 0's dynamic batch runs, under this rank's pause of its manager (as
    `ManagerSlot.paused` does on rank 0); its outcome is rank 0's to report."""
    import torch

    with contextlib.ExitStack() as stack:
        if manager is not None and manager.is_running():
            try:
                stack.enter_context(manager.pause())
            except RuntimeError:  # the loop ended before it could pause
                pass
        torch.manual_seed(seed)
        try:
            handler.run(items, params)
        except Exception as e:  # rank 0 meets the same error, and reports it
            log.debug("a mirrored batch failed: %s", e)


if __name__ == "__main__":
    status = follow(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    # at once: the manager's loop (not a daemon thread) may be stuck in a collective
    # with a rank that is gone, and would hold a normal exit for ever
    logging.shutdown()
    os._exit(status)
