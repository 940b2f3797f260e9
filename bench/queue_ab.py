"""The queue benchmark (`pipeq bench --queue`) of two checkouts, alternately, on one
machine: before/after figures measured side by side (docs/scale.md).

    python bench/queue_ab.py BEFORE_DIR AFTER_DIR [--rounds 2] [--jobs 1500]

Each directory is a checkout with its own `.venv` (`make install`); each round runs the
benchmark once in each, before first. The JSON of each run is written next to this
script's working directory as queue-<name>-<round>.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

RUN = (
    "import argparse; from pipeq.worker.bench_queue import queue_main; "
    "queue_main(argparse.Namespace(models_dir={models!r}, max_batch_size=None, "
    "max_batch_wait_ms=None, jobs={jobs}, producers=4, rounds=1, idle_s=10, json={out!r}))"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1500)
    args = p.parse_args()
    models = str((Path.cwd() / ".cache/pipeq-models").resolve())
    for r in range(1, args.rounds + 1):
        for name, tree in (("before", args.before), ("after", args.after)):
            out = str(Path.cwd() / f"queue-{name}-{r}.json")
            code = RUN.format(models=models, jobs=args.jobs, out=out)
            print(f"== {name} ({tree}), round {r}", flush=True)
            python = tree.resolve() / ".venv/bin/python"
            subprocess.run([str(python), "-c", code], cwd=tree, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
