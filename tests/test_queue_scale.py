"""The queue at scale (docs/scale.md): what a worker costs Redis, whatever it holds.

Real redis-server and worker processes; connections counted from the worker process's
own sockets (psutil), not from what the code says it opens.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from .cluster import Cluster, renamed

pytestmark = pytest.mark.timeout(180)


def _connections_to(pid: int, port: int) -> int:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def test_a_worker_holding_a_thousand_jobs_keeps_eight_connections(
    tmp_path: Path, deployments: dict[str, Any]
) -> None:
    """max_batch_size 256 gives 1,280 job threads (four batches held, and room for one of
    high jobs); before, each thread storing a result held a connection of its own (about
    200 after a burst)."""
    # the worker's --concurrency: (HELD_BATCHES + HIGH_ROOM_BATCHES) x max_batch_size
    big = renamed(deployments["sentiment-analysis"], "big", max_batch_size=256)
    cluster = Cluster(tmp_path, {"big": big})
    try:
        first = cluster.start_worker("big")  # announces the deployment, then goes
        cluster.hostname(first, "big")
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        with cluster.client(no_worker_grace_s=600) as client:
            # queued while no worker runs: the next one takes as many as it may hold at once
            jobs = [client.submit("big", f"text number {i} " * (1 + i % 7)) for i in range(700)]
            proc = cluster.start_worker("big")
            hostname = cluster.hostname(proc, "big")
            held, peak = 0, 0
            for job in jobs:
                peak = max(peak, _connections_to(proc.pid, cluster.port))
                held = max(held, cluster.inflight(hostname))
                job.result(timeout=120)
            after = _connections_to(proc.pid, cluster.port)
        assert held > 256, f"{held} jobs held at most: the premise (more than a batch) failed"
        assert 0 < after <= 8, f"{after} connections after 700 jobs"
        assert peak <= 8, f"{peak} connections at the peak"
    finally:
        cluster.close()
