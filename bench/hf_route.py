"""What the Hugging Face route costs: one tiny-model job (sentiment-analysis) four ways,
taken in turn (side by side), --jobs times a round: `Client.submit().result()`,
`POST /v1/jobs` with `Prefer: wait`, `POST /models/{m}` (httpx), and huggingface_hub's
`InferenceClient.text_classification` on that URL; p50 and p90 of each (ms).

One redis-server, one real sentiment worker and one gateway process (no keys:
loopback), all started here:

    .venv/bin/python bench/hf_route.py --rounds 3 --jobs 200
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from statistics import median

import httpx
from gateway import DEPLOYMENT, gateway_stack  # bench/gateway.py, run as a script here
from huggingface_hub import InferenceClient, constants

from pipeq import Client

#: huggingface_hub's offline mode (HF_HUB_OFFLINE=1, this machine's) refuses every URL,
#: the gateway's on loopback too; the workers stay offline
constants.HF_HUB_OFFLINE = False

TEXT = "I've been waiting for this all my life."


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def paths(url: str, client: Client, http: httpx.Client) -> dict[str, Callable[[], object]]:
    hf = InferenceClient(model=f"{url}/models/{DEPLOYMENT}")
    job = {"deployment": DEPLOYMENT, "inputs": TEXT}

    def native() -> object:
        r = http.post("/v1/jobs", json=job, headers={"Prefer": "wait=30"})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        return r

    def hf_route() -> object:
        r = http.post(f"/models/{DEPLOYMENT}", json={"inputs": TEXT})
        assert r.status_code == 200, r.text
        return r

    return {
        "Client.submit().result()": lambda: client.submit(DEPLOYMENT, TEXT).result(timeout=30),
        "POST /v1/jobs, Prefer: wait": native,
        "POST /models/{m} (httpx)": hf_route,
        "InferenceClient": lambda: hf.text_classification(TEXT),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--models-dir", default=".cache/pipeq-models")
    args = ap.parse_args()
    with gateway_stack(args.models_dir, "hf", 17100, 18200) as (stack, url, _):
        with Client(stack.url) as client, httpx.Client(base_url=url, timeout=30) as http:
            ways = paths(url, client, http)
            for call in ways.values():  # warm every path (connections, caches)
                for _ in range(20):
                    call()
            print(f"one job, p50 / p90 in ms ({args.jobs} jobs per round per way, in turn)")
            print(f"{'round':>5}  " + "  ".join(f"{name:>28}" for name in ways))
            every: dict[str, list[float]] = {name: [] for name in ways}
            for n in range(1, args.rounds + 1):
                took: dict[str, list[float]] = {name: [] for name in ways}
                order = list(ways)
                for i in range(args.jobs):
                    for name in order[i % 4 :] + order[: i % 4]:  # each way first in turn
                        t = time.perf_counter()
                        ways[name]()
                        took[name].append((time.perf_counter() - t) * 1000)
                for name, values in took.items():
                    every[name] += values
                print(
                    f"{n:>5}  "
                    + "  ".join(f"{median(v):>13.2f} / {p90(v):>12.2f}" for v in took.values())
                )
            print(
                f"{'all':>5}  "
                + "  ".join(f"{median(v):>13.2f} / {p90(v):>12.2f}" for v in every.values())
            )


if __name__ == "__main__":
    main()
