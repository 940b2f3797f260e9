"""One bad request among good ones: how many jobs are answered (issue 24, points 1-2).

Each scenario starts a real redis-server and real workers (no supervisor: a worker that
exits stays down, as under `pipeq up` before it restarted workers), submits good jobs
with the issue's bad requests among them, waits up to --wait-s for every job, and counts:

    accepted        submit returned a Job (the rest were refused at submit)
    answered once   a result or a typed error stored, and (generation) one `end` in its stream
    answered twice  more than one `end` in its stream
    lost            no outcome within --wait-s of its phase
    good failed     good jobs that ended with an error (a batch-mate's fault)

Scenarios:

    cb-hello        tiny gpt2 (1,024 positions), continuous batching, one worker: 8 greedy
                    jobs with `"hello", max_new_tokens=1023, do_sample=False` among them;
                    then (the next request) 8 more and the same bad one
    dynamic-hello   the same on the dynamic batcher, the bad ones with do_sample=True
    ner-stride      two ner workers (512 positions): 8 jobs and one `stride=510,
                    aggregation_strategy="simple"` on a long text (a Rust panic); 8 more

Run from the repository root (against other code: PYTHONPATH=<an install of it>):

    .venv/bin/python bench/one_request.py --wait-s 180
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeq import Client  # noqa: E402
from pipeq._ledger import stream_key  # noqa: E402
from pipeq.errors import PipeqError  # noqa: E402
from pipeq.worker.demo import demo_config  # noqa: E402
from tests.cluster import Cluster, renamed  # noqa: E402

MODELS = ROOT / ".cache" / "pipeq-models"
HELLO = ("hello", {"max_new_tokens": 1023})
LONG = "Sylvain works at Hugging Face in Brooklyn. " * 200


def scenario(name: str) -> tuple[list[Any], list[list[tuple[Any, dict[str, Any], bool]]], int]:
    """(deployments, phases of [(input, params, bad)], workers per deployment). A phase is
    submitted once the one before has ended (or --wait-s passed), and 5 s later (a
    heartbeat, after which a worker whose batcher stopped exits)."""
    d = demo_config(MODELS)
    if name in ("cb-hello", "dynamic-hello"):
        engine = "continuous" if name == "cb-hello" else "dynamic"
        dep = renamed(d["text-generation"], name, batching=engine, max_batch_size=4)
        bad = (HELLO[0], {**HELLO[1], "do_sample": engine == "dynamic"}, True)
        phases = []
        for p in range(2):  # the second: "the next such request"
            jobs = [(f"The course {p}-{i} teaches", {"max_new_tokens": 24, "do_sample": False},
                     False) for i in range(8)]  # fmt: skip
            jobs.insert(4, bad)
            phases.append(jobs)
        return [dep], phases, 1
    dep = renamed(d["ner"], name, max_batch_size=4)
    good = [[(f"Clara {p}-{i} lives in Paris.", {"aggregation_strategy": "simple"}, False)
             for i in range(8)] for p in range(2)]  # fmt: skip
    good[0].insert(4, (LONG, {"stride": 510, "aggregation_strategy": "simple"}, True))
    return [dep], good, 2


def run(name: str, wait_s: float) -> dict[str, Any]:
    deployments, phases, workers = scenario(name)
    counts = dict.fromkeys(
        ["submitted", "accepted", "answered once", "answered twice", "lost", "good failed",
         "bad refused", "bad failed"], 0)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), {x.name: x for x in deployments})
        try:
            procs = [cluster.start_worker(name) for _ in range(workers)]
            for p in procs:
                cluster.hostname(p, name, timeout_s=300)
            with Client(cluster.url) as client:
                for cases in phases:
                    jobs = []
                    for inputs, params, bad in cases:
                        counts["submitted"] += 1
                        try:
                            jobs.append((client.submit(name, inputs, **params), bad))
                            counts["accepted"] += 1
                        except PipeqError:
                            counts["bad refused"] += bad
                    deadline = time.monotonic() + wait_s
                    for job, bad in jobs:
                        try:
                            job.result(timeout=max(0.1, deadline - time.monotonic()))
                            error = ""
                        except PipeqError as e:
                            error = type(e).__name__
                            if error == "JobTimeout":
                                counts["lost"] += 1
                                continue
                        counts["good failed"] += bool(error) and not bad
                        counts["bad refused"] += bad and error == "InvalidRequest"
                        counts["bad failed"] += bad and error not in ("", "InvalidRequest")
                        ends = [f for _, f in cluster.redis().xrange(stream_key(job.id))
                                if b"end" in f]  # fmt: skip
                        counts["answered twice" if len(ends) > 1 else "answered once"] += 1
                    time.sleep(5)
                counts["workers exited"] = sum(p.poll() is not None for p in procs)
                return counts
        finally:
            cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", default=["cb-hello", "dynamic-hello", "ner-stride"])
    parser.add_argument("--wait-s", type=float, default=180.0)
    args = parser.parse_args()
    for name in args.scenarios:
        print(name, run(name, args.wait_s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
