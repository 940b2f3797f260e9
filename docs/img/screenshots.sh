#!/usr/bin/env bash
# Retake the screenshots in docs/img/ from a real run:  bash docs/img/screenshots.sh
#
# Builds (or reuses) the demo's tiny local models, starts `pipeq up` with four
# deployments on free ports, sends a burst of jobs, then a round of each deployment and
# two bad inputs through Flower's API, takes `pipeq status` under load and after it,
# screenshots Flower's pages and the status output with headless Chromium, and stops the
# stack. Offline; needs `make install` and `chromium`.
# Env: PYTHON (default .venv/bin/python), CHROMIUM (default chromium).
set -euo pipefail

cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
CHROMIUM=${CHROMIUM:-chromium}
IMG=$PWD/docs/img
MODELS=.cache/pipeq-models
WORK=$(mktemp -d /tmp/pipeq-shots.XXXXXX)
W=1400
H=800

free_port() { "$PY" -c "from pipeq._stack import free_port_from; print(free_port_from($1))"; }
REDIS_PORT=$(free_port 6480)
FLOWER_PORT=$(free_port 5580)
EXPORTER_PORT=$(free_port 9880)
FLOWER="http://127.0.0.1:$FLOWER_PORT"

# 1. a config of four deployments on the demo's tiny checkpoints
"$PY" - "$MODELS" "$WORK/pipeq.toml" <<'EOF'
import sys
from pathlib import Path
from pipeq.worker.demo import demo_config, write_config

deployments = demo_config(Path(sys.argv[1]))
keep = ["sentiment-analysis", "ner", "fill-mask", "text-generation"]
write_config({name: deployments[name] for name in keep}, Path(sys.argv[2]))
EOF

# 2. the stack, in the background; stopped (SIGTERM) whatever happens
env -u PIPEQ_REDIS_URL "$BIN/pipeq" up --config "$WORK/pipeq.toml" --redis-port "$REDIS_PORT" \
    --flower-port "$FLOWER_PORT" --exporter-port "$EXPORTER_PORT" >"$WORK/up.log" 2>&1 &
UP=$!
stop() {
    if kill -0 "$UP" 2>/dev/null; then
        kill -TERM "$UP"
        wait "$UP" || true
    fi
}
trap stop EXIT
for _ in $(seq 240); do
    grep -q "pipeq is up" "$WORK/up.log" && break
    kill -0 "$UP" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
    sleep 0.5
done
grep -q "pipeq is up" "$WORK/up.log" || { cat "$WORK/up.log"; exit 1; }
cat "$WORK/up.log"
# set only now: `pipeq up` takes $PIPEQ_REDIS_URL as a Redis of its own, not to embed
export PIPEQ_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

shot() {  # shot URL FILE [HEIGHT [WIDTH]]: a PNG of the page once its scripts have run
    "$CHROMIUM" --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
        --virtual-time-budget=10000 --window-size="${4:-$W},${3:-$H}" \
        --screenshot="$2" "$1" >/dev/null 2>&1
    echo "wrote $2"
}

# 3. the load: every deployment, and a backlog of generations
"$PY" - <<'EOF' &
from pipeq import Client

with Client() as client:
    jobs = [client.submit("text-generation", f"Job {i}: in this course, we will teach you",
                          max_new_tokens=200, do_sample=True) for i in range(150)]
    jobs += [client.submit("sentiment-analysis", t) for t in
             ["I've been waiting for a HuggingFace course my whole life.", "You monster!"] * 10]
    jobs += [client.submit("ner", "My name is Sylvain and I work at Hugging Face in Brooklyn.",
                           aggregation_strategy="simple") for _ in range(10)]
    jobs += [client.submit("fill-mask", "This course will teach you all about <mask> models.",
                           top_k=2) for _ in range(10)]
    for job in jobs:
        job.result(timeout=600)
EOF
LOAD=$!
sleep 3

status() {  # status FILE: the command line, then its output
    { echo "\$ pipeq status"; "$BIN/pipeq" status || true; } >>"$1"
}
status "$WORK/status.txt"
shot "$FLOWER/broker" "$IMG/flower-broker.png"
shot "$FLOWER/tasks" "$WORK/flower-tasks-busy.png"  # RECEIVED, STARTED: not in the docs

wait "$LOAD"

# a last round of every deployment, so that the top of Flower's Tasks page shows them
# all; then two bad inputs the client would refuse, sent through Flower's API: the
# worker refuses them (FAILURE)
"$PY" - <<'EOF' &
from pipeq import Client

with Client() as client:
    jobs = []
    for i in range(3):
        jobs.append(client.submit("sentiment-analysis", "You clever monster!"))
        jobs.append(client.submit("ner", "Sylvain works at Hugging Face in Brooklyn."))
        jobs.append(client.submit("fill-mask", "She is crying. I should <mask> her.", top_k=3))
        jobs.append(client.submit("text-generation", "In this course,", max_new_tokens=20))
    for job in jobs:
        job.result(timeout=120)
EOF
LAST=$!
bad() {  # bad DEPLOYMENT KWARGS: send through Flower, keep what Flower then says of it
    local id
    id=$(curl -sS -X POST "$FLOWER/api/task/send-task/pipeq.run" \
        -d "{\"kwargs\": $2, \"queue\": \"pipeq.$1\"}" |
        "$PY" -c 'import json, sys; print(json.load(sys.stdin)["task-id"])')
    sleep 1
    echo "$1 $2 -> $(curl -sS "$FLOWER/api/task/result/$id")" >>"$WORK/bad.txt"
}
wait "$LAST"
bad sentiment-analysis '{"inputs": {"not": "a text"}, "params": {}}'
bad fill-mask '{"inputs": "no mask here", "params": {}}'
cat "$WORK/bad.txt"
sleep 3  # the last events reach Flower, the counters the heartbeats
echo >>"$WORK/status.txt"
status "$WORK/status.txt"
cat "$WORK/status.txt"

shot "$FLOWER/tasks" "$IMG/flower-tasks.png" 1000
shot "$FLOWER/workers" "$IMG/flower-workers.png" 640

# 4. `pipeq status`, as a dark terminal
"$PY" - "$WORK/status.txt" "$WORK/status.html" <<'EOF'
import html
import sys

text = open(sys.argv[1]).read().rstrip("\n")
body = "\n".join(
    f'<span class="cmd">{html.escape(line)}</span>' if line.startswith("$ ") else html.escape(line)
    for line in text.split("\n")
)
page = f"""<!doctype html><meta charset="utf-8"><style>
html, body {{ margin: 0; background: #1e1e1e; }}
pre {{ margin: 0; padding: 18px 22px; color: #d4d4d4;
      font: 15px/1.45 "DejaVu Sans Mono", "Liberation Mono", monospace; }}
.cmd {{ color: #8fd16a; }}
</style><pre>{body}</pre>"""
open(sys.argv[2], "w").write(page)
EOF
lines=$(wc -l <"$WORK/status.txt")
shot "file://$WORK/status.html" "$IMG/pipeq-status.png" $((lines * 22 + 40)) 760

# 5. the exporter's samples of the deployments' state, as text (not a picture)
{
    echo "\$ curl -s http://127.0.0.1:$EXPORTER_PORT/metrics | grep -E '^pipeq_(workers|queue_depth|jobs_total)'"
    curl -s "http://127.0.0.1:$EXPORTER_PORT/metrics" | grep -E '^pipeq_(workers|queue_depth|jobs_total)'
} >"$WORK/metrics.txt"
cat "$WORK/metrics.txt"

stop
trap - EXIT
echo "work files: $WORK"
