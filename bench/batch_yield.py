"""Do OpenAI batches starve interactive requests? An interactive `/v1/embeddings`
request's latency (p50 / p90 / max, ms, one request at a time) three ways, on one
real worker of the feature-extraction deployment (the packaged all-MiniLM-L6-v2):

  idle        nothing else runs;
  batch       while a batch of --lines embedding lines runs through the Batch API (its
              runner keeps IN_FLIGHT_PER_DEPLOYMENT lines queued or running);
  flooded     the same lines sent at once as native jobs (what a batch runner without
              the bound would do): the interactive request queues behind them all.

Also the batch's lines/s. One redis-server, one worker and one gateway (no keys:
loopback), all started here:

    .venv/bin/python bench/batch_yield.py --lines 5000
"""

from __future__ import annotations

import argparse
import json
import time

import gateway as bench_gateway
import httpx
from gateway import gateway_stack  # bench/gateway.py, run as a script here

from pipeq import Client

DEPLOYMENT = "feature-extraction"
TEXT = "An interactive request arrives while a large batch runs."


def line(i: int) -> str:
    body = {"model": DEPLOYMENT, "input": f"Batch line number {i} is a short sentence."}
    return json.dumps(
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings", "body": body}
    )


def timed(http: httpx.Client) -> float:
    t = time.perf_counter()
    r = http.post("/v1/embeddings", json={"model": DEPLOYMENT, "input": TEXT})
    assert r.status_code == 200, r.text
    return (time.perf_counter() - t) * 1000


def summary(ms: list[float]) -> str:
    s = sorted(ms)
    p50, p90 = s[len(s) // 2], s[int(0.9 * (len(s) - 1))]
    return f"p50 {p50:7.1f}  p90 {p90:7.1f}  max {s[-1]:7.1f}  (n={len(s)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=5000)
    ap.add_argument("--idle", type=int, default=50)
    ap.add_argument("--models-dir", default=".cache/pipeq-models")
    args = ap.parse_args()
    bench_gateway.DEPLOYMENT = DEPLOYMENT
    with gateway_stack(args.models_dir, "batch", 17300, 18400) as (stack, url, _):
        with httpx.Client(base_url=url, timeout=300) as http, Client(stack.url) as client:
            for _ in range(10):
                timed(http)
            print(f"idle      {summary([timed(http) for _ in range(args.idle)])}")
            data = "\n".join(line(i) for i in range(args.lines)).encode()
            up = http.post(
                "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
            )
            assert up.status_code == 200, up.text
            started = time.perf_counter()
            batch = http.post(
                "/v1/batches",
                json={"input_file_id": up.json()["id"], "endpoint": "/v1/embeddings"},
            ).json()
            during: list[float] = []
            while True:
                during.append(timed(http))
                state = http.get(f"/v1/batches/{batch['id']}").json()
                if state["status"] not in ("validating", "in_progress"):
                    break
            took = time.perf_counter() - started
            counts = state["request_counts"]
            print(f"batch     {summary(during)}")
            print(
                f"          batch of {args.lines} lines: {state['status']} in {took:.1f} s "
                f"({counts['completed'] / took:.0f} lines/s), {counts}"
            )
            texts = [f"Batch line number {i} is a short sentence." for i in range(args.lines)]
            t = time.perf_counter()
            jobs = [client.submit(DEPLOYMENT, text) for text in texts]
            sent_s = time.perf_counter() - t
            flooded = timed(http)
            print(
                f"flooded   one request after {args.lines} jobs ({sent_s:.1f} s): {flooded:.0f} ms"
            )
            for job in jobs:
                job.cancel()


if __name__ == "__main__":
    main()
