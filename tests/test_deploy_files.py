"""deploy/: the Grafana dashboard, Prometheus rules and config, and the KEDA ScaledObject
parse, and name only metrics of the exporter's contract (pipeq._metrics.METRICS).
(tests/test_k8s.py checks the rest of deploy/k8s.)

Operators import these files as they are, so a renamed metric must break CI here, not an
alert in production. promtool (Debian's `prometheus` package; .ci/run installs it) checks
the rules and config, runs the rules' unit tests and parses every other PromQL expression;
without it these tests skip locally and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeq._metrics import METRICS, OUTCOMES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "pipeq.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
KEDA = DEPLOY / "k8s" / "keda" / "scaledobjects.yaml"  # one ScaledObject per worker

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# every series name the exporter serves: histograms only through their suffixes
SERIES: dict[str, str] = {}  # series name -> metric name in METRICS
for _m in METRICS.values():
    if _m.type == "histogram":
        SERIES.update({_m.name + s: _m.name for s in HISTOGRAM_SUFFIXES})
    else:
        SERIES[_m.name] = _m.name

# the whole identifier, so that a typo such as pipeq_workers2 or pipeq_workers:x is caught
# whole rather than read as pipeq_workers
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])pipeq_[A-Za-z0-9_:]*")
SELECTOR_RE = re.compile(r"(?<![A-Za-z0-9_:])(pipeq_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
QUANTILE_RE = re.compile(r"histogram_quantile\(\s*([0-9.]+)\s*,")


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def check_expr(expr: str, where: str) -> None:
    """Every pipeq_ name in `expr` is a series of the contract, and every label matcher on
    it names one of that metric's labels (le on buckets) and, for outcome, real outcomes."""
    unknown = metric_names(expr) - SERIES.keys()
    assert not unknown, f"{where}: {sorted(unknown)} not in pipeq._metrics.METRICS: {expr!r}"
    for series, matchers in SELECTOR_RE.findall(expr):
        metric = METRICS[SERIES[series]]
        allowed = {*metric.labels, "instance", "job"}
        if series.endswith("_bucket"):
            allowed.add("le")
        for label, op, value in MATCHER_RE.findall(matchers):
            assert label in allowed, f"{where}: {series} has no label {label!r}: {expr!r}"
            if label == "outcome" and op in ("=", "=~"):
                bad = set(value.split("|")) - set(OUTCOMES)
                assert not bad, f"{where}: no outcome {sorted(bad)} (only {OUTCOMES}): {expr!r}"


# --- loading -------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))  # rows, collapsed or not


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, and every query variable's query."""
    out = [
        (p.get("title", "?"), t["expr"])
        for p in walk_panels(dash["panels"])
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append((f"${var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def keda_objects() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(KEDA.read_text()) if d is not None]


# --- every file parses ---------------------------------------------------------------


def test_every_deploy_file_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".json", ".yml", ".yaml"))
    for path in (DASHBOARD, ALERTS, ALERTS_TESTS, PROM_CONFIG, KEDA):
        assert path in files, f"{path} is missing"
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path} is empty"


# --- metric names --------------------------------------------------------------------


def test_metric_name_check_catches_what_it_should() -> None:
    """The check itself: contract names pass, near misses do not."""
    check_expr('sum(rate(pipeq_jobs_total{outcome=~"failed|lost"}[5m]))', "ok")
    check_expr("histogram_quantile(0.9, sum by (le) (rate(pipeq_batch_size_bucket[5m])))", "ok")
    for bad in (
        "pipeq_worker",  # not a metric
        "pipeq_workers2",  # whole identifier read
        "pipeq_batch_size",  # a histogram only through _bucket/_sum/_count
        "pipeq_queue_depth_bucket",  # a gauge has no buckets
        "pipeq_jobs",  # the counter is named with _total
        'pipeq_jobs_total{outcome="failure"}',  # not an outcome
        'pipeq_redis_up{deployment="x"}',  # no such label
        'pipeq_forward_seconds_sum{le="1"}',  # le only on buckets
    ):
        with pytest.raises(AssertionError):
            check_expr(bad, "bad")


def test_dashboard_names_only_contract_metrics() -> None:
    exprs = dashboard_exprs(load_dashboard())
    assert len(exprs) >= 15
    for where, expr in exprs:
        check_expr(expr, f"dashboard panel {where!r}")
    named = {SERIES[n] for _, e in exprs for n in metric_names(e)}
    # all but none: every metric of the contract is on the dashboard
    assert named == set(METRICS), f"not on the dashboard: {sorted(set(METRICS) - named)}"


def test_alerts_name_only_contract_metrics() -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    for rule in rules:
        check_expr(rule["expr"], f"alert {rule.get('alert')}")
    named = {SERIES[n] for r in rules for n in metric_names(r["expr"])}
    assert len(named) >= 4, named
    for required in (
        "pipeq_workers",
        "pipeq_queue_oldest_age_seconds",
        "pipeq_jobs_total",
        "pipeq_redis_up",
    ):
        assert required in named, f"no alert on {required}"


def test_keda_query_names_only_contract_metrics() -> None:
    for obj in keda_objects():
        (trigger,) = obj["spec"]["triggers"]
        check_expr(trigger["metadata"]["query"], f"KEDA query of {obj['metadata']['name']}")
        assert "pipeq_queue_depth" in metric_names(trigger["metadata"]["query"])


# --- the dashboard -------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    dep = variables["deployment"]
    query = dep["query"]["query"] if isinstance(dep["query"], dict) else dep["query"]
    assert re.fullmatch(r"label_values\(\s*pipeq_workers\s*,\s*deployment\s*\)", query)
    panels = list(walk_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        # every panel and target reads the data source the operator picks
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            # every query of a per-deployment metric follows the deployment selector
            per_deployment = any(
                "deployment" in METRICS[SERIES[n]].labels for n in metric_names(t["expr"])
            )
            if per_deployment:
                selectors = SELECTOR_RE.findall(t["expr"])
                assert selectors and all('deployment=~"$deployment"' in m for _, m in selectors), (
                    f"{p['title']!r} ignores $deployment: {t['expr']!r}"
                )


def test_dashboard_covers_the_topics() -> None:
    dash = load_dashboard()
    panels = [p for p in walk_panels(dash["panels"]) if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]

    def some_expr(*metrics: str, contains: str = "") -> bool:
        return any(all(m in metric_names(e) for m in metrics) and contains in e for e in exprs)

    assert some_expr("pipeq_queue_depth"), "queue depth"
    assert some_expr("pipeq_queue_oldest_age_seconds"), "oldest age"
    assert some_expr("pipeq_workers") and some_expr("pipeq_jobs_running"), "workers, running"
    assert some_expr("pipeq_jobs_total", contains="rate("), "throughput by outcome"
    assert any("outcome" in e and "rate(" in e and "pipeq_jobs_total" in e for e in exprs)
    assert some_expr("pipeq_jobs_total", contains="/"), "failure ratio"
    assert some_expr("pipeq_batch_size_bucket", contains="histogram_quantile("), "batch size"
    for histogram in ("pipeq_queue_wait_seconds_bucket", "pipeq_forward_seconds_bucket"):
        quantiles = {
            float(q) for e in exprs if histogram in metric_names(e) for q in QUANTILE_RE.findall(e)
        }
        assert {0.5, 0.95, 0.99} <= quantiles, f"{histogram}: quantiles {quantiles}"
    assert some_expr("pipeq_gpu_memory_used_bytes"), "GPU memory used"
    assert some_expr("pipeq_gpu_memory_total_bytes"), "GPU memory total"
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("depth", "oldest", "outcome", "failure", "batch", "wait", "forward", "gpu"):
        assert word in titles, f"no panel title says {word!r}"


# --- the alerting rules --------------------------------------------------------------


def test_alert_rules_are_labelled_and_explained() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), rule["alert"]
        if "by (deployment)" in rule["expr"]:  # the alert carries the label: say it
            for field in ("summary", "description"):
                assert "$labels.deployment" in rule["annotations"][field], rule["alert"]
    exprs = " ".join(r["expr"] for r in rules)
    assert "absent(pipeq_workers)" in exprs.replace(" ", ""), "no alert on absent workers"
    # the thresholds the issue asks for
    assert any(
        "pipeq_workers" in r["expr"] and "== 0" in r["expr"] and r["for"] == "2m" for r in rules
    )
    assert any(
        "pipeq_queue_oldest_age_seconds" in r["expr"] and "> 300" in r["expr"] and r["for"] == "5m"
        for r in rules
    )
    assert any(
        "pipeq_jobs_total" in r["expr"] and "> 0.05" in r["expr"] and r["for"] == "10m"
        for r in rules
    )
    assert any("pipeq_redis_up == 0" in r["expr"] for r in rules)


# --- the KEDA ScaledObject -----------------------------------------------------------


def test_keda_scaled_objects() -> None:
    objects = keda_objects()
    assert objects
    for obj in objects:
        check_keda_scaled_object(obj)


def check_keda_scaled_object(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert obj["kind"] == "ScaledObject"
    spec = obj["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"].startswith("pipeq-worker-")
    assert isinstance(spec["minReplicaCount"], int) and isinstance(spec["maxReplicaCount"], int)
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert isinstance(spec["cooldownPeriod"], int) and spec["cooldownPeriod"] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    # KEDA's trigger metadata is a map of strings: an unquoted number is rejected
    for key, value in meta.items():
        assert isinstance(value, str), f"triggers[0].metadata.{key} must be a string"
    assert meta["serverAddress"].startswith(("http://", "https://"))
    assert float(meta["threshold"]) > 0
    assert float(meta.get("activationThreshold", "0")) >= 0
    query = meta["query"]
    assert "pipeq_queue_depth" in metric_names(query)
    assert query.lstrip().startswith("sum(")
    # the query reads the deployment that the scaled workers serve
    deployments = set(re.findall(r'deployment="([^"]+)"', query))
    assert len(deployments) == 1, deployments
    assert target["name"] == f"pipeq-worker-{deployments.pop()}"


# --- promtool ------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        reason = "promtool not on PATH (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must check the Prometheus files, not skip them")
        pytest.skip(reason)
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.args}:\n{proc.stdout}\n{proc.stderr}"
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(ALERTS))
    assert_ok(proc)
    assert f"{len(alert_rules())} rules found" in proc.stdout + proc.stderr


def test_promtool_check_config() -> None:
    assert_ok(promtool("check", "config", str(PROM_CONFIG)))


def test_promtool_alert_unit_tests() -> None:
    proc = promtool("test", "rules", str(ALERTS_TESTS))
    assert_ok(proc)
    # every alert is exercised by at least one case
    tested = {
        t["alertname"] for case in load_yaml(ALERTS_TESTS)["tests"] for t in case["alert_rule_test"]
    }
    assert tested == {r["alert"] for r in alert_rules()}


def test_promtool_parses_dashboard_and_keda_queries(tmp_path: Path) -> None:
    """Grafana and KEDA check their PromQL only when run; promtool parses it here, as
    recording rules, with Grafana's variables replaced by values of their kind."""
    exprs = [e for _, e in dashboard_exprs(load_dashboard()) if not e.startswith("label_values(")]
    exprs += [o["spec"]["triggers"][0]["metadata"]["query"] for o in keda_objects()]
    rules = [
        {
            "record": f"pipeq_check:expr_{i}",
            "expr": e.replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$deployment", ".*"),
        }
        for i, e in enumerate(exprs)
    ]
    assert not any("$" in r["expr"] for r in rules), "an unreplaced Grafana variable"
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    proc = promtool("check", "rules", str(path))
    assert_ok(proc)
    assert f"{len(rules)} rules found" in proc.stdout + proc.stderr
