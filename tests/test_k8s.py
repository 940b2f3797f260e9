"""deploy/k8s: the Kubernetes manifests are valid for Kubernetes and agree with pipeq.

No cluster here: every object of a standard kind is validated against the OpenAPI schemas
of Kubernetes KUBERNETES_VERSION (kubernetes-validate, strict: an unknown or misspelt
field fails), and the KEDA and Prometheus Operator objects, whose schemas come with
their CRDs, are checked field by field. Then what a schema cannot see: one worker
Deployment per deployment of the TOML the workers mount, GPUs asked for and indexed as a
container sees them, the Redis password only from its Secret, probes that read the
worker's health file, no container as root, selectors that select something. With
`kubectl` on PATH, `kubectl kustomize` renders both kustomizations too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KEDA_DIR = K8S / "keda"
COMPOSE_TOML = ROOT / "deploy" / "pipeq.toml"
DOCS = ROOT / "deploy" / "README.md"
KUBERNETES_VERSION = "1.30.0"
# kinds whose schema comes with a CRD (not in Kubernetes'), and what installs it
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "KEDA",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator",
}
REDIS_SECRET = ("pipeq-redis", "password")
GPU = "nvidia.com/gpu"
PART_OF = {"app.kubernetes.io/part-of": "pipeq"}

Obj = dict[str, Any]


# --- loading -------------------------------------------------------------------------


def load_docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(directory: Path) -> Obj:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def manifest_files() -> list[Path]:
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    assert files
    return files


def generated_configmaps(directory: Path) -> list[Obj]:
    """The ConfigMaps of a configMapGenerator, as kustomize makes them (less the hash)."""
    out = []
    for gen in kustomization(directory).get("configMapGenerator", []):
        data = {}
        for spec in gen["files"]:
            key, _, name = spec.rpartition("=")
            data[key or Path(name).name] = (directory / name).read_text()
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"], "labels": dict(PART_OF)},
                "data": data,
            }
        )
    return out


def applied_by(directory: Path) -> list[Obj]:
    """What `kubectl apply -k directory` creates (names without kustomize's hash)."""
    k = kustomization(directory)
    objs = [d for r in k["resources"] for d in load_docs(directory / r)]
    return objs + generated_configmaps(directory)


BASE = applied_by(K8S)
KEDA = applied_by(KEDA_DIR)
EVERY = [d for p in manifest_files() for d in load_docs(p)] + generated_configmaps(K8S)


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def name(obj: Obj) -> str:
    value = obj["metadata"]["name"]
    assert isinstance(value, str)
    return value


def pod_spec(obj: Obj) -> Obj:
    spec = obj["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def containers(obj: Obj) -> list[Obj]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def entrypoint() -> list[str]:
    """The image's ENTRYPOINT (exec form) in the Dockerfile the manifests' image is built from."""
    (line,) = [
        ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT")
    ]
    value = json.loads(line.removeprefix("ENTRYPOINT"))
    assert isinstance(value, list)
    return value


def argv(container: Obj) -> list[str]:
    """The process a container runs: command (else the image's entrypoint) plus args."""
    return [*container.get("command", entrypoint()), *container.get("args", [])]


def toml_deployments() -> dict[str, Obj]:
    """deploy/k8s/pipeq.toml as pipeq reads it: [deployments.NAME] tables."""
    data = tomllib.loads((K8S / "pipeq.toml").read_text())
    deployments = data["deployments"]
    assert isinstance(deployments, dict) and deployments
    return deployments


def workers() -> dict[str, Obj]:
    """pipeq deployment name -> its worker Deployment (every Deployment that runs
    `pipeq worker`, whatever its labels say)."""
    out: dict[str, Obj] = {}
    for d in of_kind(BASE, "Deployment"):
        (c,) = pod_spec(d)["containers"]
        cmd = argv(c)
        if cmd[:2] == ["pipeq", "worker"]:
            assert cmd[2] not in out, f"two worker Deployments for {cmd[2]}"
            out[cmd[2]] = d
    return out


def gpu_arg(cmd: list[str]) -> str | None:
    for i, arg in enumerate(cmd):
        if arg == "--gpu":
            return cmd[i + 1]
        if arg.startswith("--gpu="):
            return arg.split("=", 1)[1]
    return None


def is_gpu(deployment: Obj) -> bool:
    return str(deployment.get("device", "cpu")).startswith("cuda")


# --- the files and the kustomizations -------------------------------------------------


def test_kustomizations_list_every_manifest() -> None:
    """Every file a kustomization names exists, every manifest is applied by one, except
    files of CRD kinds only, which are applied with -f where their operator exists."""
    listed = set()
    for directory in (K8S, KEDA_DIR):
        k = kustomization(directory)
        assert k["kind"] == "Kustomization"
        assert "namespace" not in k, "namespace-agnostic: apply -n, or set it per cluster"
        for r in k["resources"]:
            assert (directory / r).is_file(), f"{directory}/kustomization.yaml: no {r}"
            listed.add((directory / r).resolve())
        for gen in k.get("configMapGenerator", []):
            for spec in gen["files"]:
                assert (directory / spec.rpartition("=")[2]).is_file()
    for path in manifest_files():
        if path.resolve() not in listed:
            kinds = {(d["apiVersion"], d["kind"]) for d in load_docs(path)}
            assert kinds <= CRD_KINDS.keys(), f"{path} is applied by no kustomization"


def test_base_applies_without_crds() -> None:
    """`kubectl apply -k deploy/k8s` works on a cluster without KEDA or the operator."""
    assert not [name(o) for o in BASE if (o["apiVersion"], o["kind"]) in CRD_KINDS]
    assert {o["kind"] for o in KEDA} == {"ScaledObject"}


def test_standard_kinds_validate_against_kubernetes_schemas() -> None:
    errors = []
    checked = 0
    for obj in EVERY:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{obj['kind']}/{name(obj)}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{obj['kind']}/{name(obj)}: {e.message} (a CRD kind? add to CRD_KINDS)")
    assert not errors, "\n".join(errors)
    assert checked >= 12  # Services, StatefulSet, Deployments, PVC, ConfigMap


def test_validation_catches_a_broken_manifest() -> None:
    """The check itself: a misspelt field and a wrong type fail."""
    deployment = json.loads(json.dumps(next(iter(workers().values()))))
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    c = pod_spec(deployment)["containers"][0]
    c["livenesProbe"] = c.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    c["livenessProbe"] = c.pop("livenesProbe")
    pod_spec(deployment)["terminationGracePeriodSeconds"] = "330"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_labels_and_no_namespace() -> None:
    for obj in EVERY:
        meta = obj["metadata"]
        assert "namespace" not in meta, f"{obj['kind']}/{name(obj)} names a namespace"
        labels = meta.get("labels", {})
        if obj["kind"] != "ConfigMap":  # generated: kustomize's labels only
            assert labels.get("app.kubernetes.io/name") == "pipeq", name(obj)
            assert labels.get("app.kubernetes.io/component"), name(obj)
    for w in workloads(EVERY):
        selector = w["spec"]["selector"]["matchLabels"]
        template = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template.items(), f"{name(w)}: selector selects no pod"
        assert (
            template["app.kubernetes.io/component"]
            == w["metadata"]["labels"]["app.kubernetes.io/component"]
        )


def test_services_select_pods_and_ports() -> None:
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(BASE)]
    for svc in of_kind(BASE, "Service"):
        selector = svc["spec"]["selector"]
        matched = [w for w, labels in pods if selector.items() <= labels.items()]
        assert matched, f"Service {name(svc)} selects no pod"
        for w in matched:
            ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c["ports"]}
            for port in svc["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), (name(svc), target)
    for sts in of_kind(BASE, "StatefulSet"):
        assert sts["spec"]["serviceName"] in {name(s) for s in of_kind(BASE, "Service")}


# --- the workers and pipeq's config ---------------------------------------------------


def test_k8s_toml_is_the_compose_one() -> None:
    """deploy/k8s/pipeq.toml is a copy of deploy/pipeq.toml: the same deployments."""
    assert tomllib.loads((K8S / "pipeq.toml").read_text()) == tomllib.loads(
        COMPOSE_TOML.read_text()
    )


def test_one_worker_deployment_per_toml_deployment() -> None:
    declared = toml_deployments()
    served = workers()
    assert set(served) == set(declared), (
        f"no worker Deployment: {sorted(set(declared) - set(served))}; "
        f"not in pipeq.toml: {sorted(set(served) - set(declared))}"
    )
    (cm,) = generated_configmaps(K8S)
    for dep_name, d in served.items():
        assert name(d) == f"pipeq-worker-{dep_name}"
        for labels in (d["metadata"]["labels"], d["spec"]["template"]["metadata"]["labels"]):
            assert labels["app.kubernetes.io/component"] == "worker"
            assert labels["pipeq/deployment"] == dep_name
        spec = pod_spec(d)
        (c,) = spec["containers"]
        env = env_of(c)
        # PIPEQ_CONFIG is the ConfigMap's TOML, where the pod mounts it
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        config = Path(env["PIPEQ_CONFIG"]["value"])
        mount = mounts[str(config.parent)]
        assert volumes[mount["name"]]["configMap"]["name"] == name(cm)
        assert config.name in cm["data"]
        # the shared model cache
        assert env["HF_HOME"]["value"] == "/models"
        claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
        (pvc,) = [p for p in of_kind(BASE, "PersistentVolumeClaim") if name(p) == claim]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        # a warm shutdown lets the running batch finish: up to job_timeout_s
        timeout = float(declared[dep_name].get("job_timeout_s", 300))
        assert spec["terminationGracePeriodSeconds"] >= timeout + 30, "SIGKILL mid-job"
        assert "replicas" not in d["spec"], f"{name(d)}: KEDA's HPA owns replicas"


def test_gpu_workers_ask_for_one_gpu_as_index_0() -> None:
    declared = toml_deployments()
    kinds = set()
    for dep_name, d in workers().items():
        (c,) = pod_spec(d)["containers"]
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        gpu = gpu_arg(argv(c))
        if is_gpu(declared[dep_name]):
            kinds.add("gpu")
            assert str(limits.get(GPU)) == "1", f"{name(d)}: limits {GPU} must be 1"
            assert str(requests.get(GPU, 1)) == "1"
            # inside the container its one GPU is index 0, whatever the host's index
            assert gpu in (None, "0"), f"{name(d)}: --gpu {gpu} names a GPU it cannot see"
        else:
            kinds.add("cpu")
            assert GPU not in limits and GPU not in requests, f"{name(d)} runs on the CPU"
            assert gpu is None, f"{name(d)}: --gpu on a CPU deployment"
    assert kinds == {"cpu", "gpu"}, "the check needs a worker of each kind"


def test_worker_probes_read_the_health_file() -> None:
    for d in workers().values():
        (c,) = pod_spec(d)["containers"]
        env = env_of(c)
        cmd = argv(c)
        if "--health-file" in cmd:
            health = cmd[cmd.index("--health-file") + 1]
        else:
            health = env["PIPEQ_HEALTH_FILE"]["value"]
        dead_after = float(env.get("PIPEQ_DEAD_AFTER_S", {}).get("value", "10"))
        heartbeat = float(env.get("PIPEQ_HEARTBEAT_S", {}).get("value", "2"))
        assert 0 < heartbeat < dead_after / 2
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert str(Path(health).parent) in mounts, "the health file needs a writable dir"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            assert probe, f"{name(d)}: no {kind}"
            script = " ".join(probe["exec"]["command"])
            m = re.search(r"find (\S+) -newermt '-(\d+) seconds' \| grep -q \.", script)
            assert m, f"{name(d)} {kind}: {script!r}"
            assert m.group(1) == health, f"{name(d)} {kind} reads {m.group(1)}, not {health}"
            assert float(m.group(2)) == dead_after, f"{name(d)} {kind}: window != dead_after_s"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model download"
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 2 * dead_after


# --- Redis and its password ------------------------------------------------------------


def secret_refs() -> Iterator[tuple[str, tuple[str, str]]]:
    for w in workloads(EVERY):
        for c in containers(w):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    yield f"{name(w)}/{c['name']}", (ref["name"], ref["key"])


def test_redis_url_password_only_from_the_secret() -> None:
    services = {name(s): s for s in of_kind(BASE, "Service")}
    users = 0
    for w in workloads(EVERY):
        for c in containers(w):
            where = f"{name(w)}/{c['name']}"
            for e in c.get("env", []):
                assert "redis://:" not in str(e.get("value", "")).replace("redis://:$(", ""), (
                    f"{where}: a password written in {e['name']}"
                )
            for arg in argv(c):
                assert "redis://" not in arg, f"{where}: a Redis URL on the command line"
            env = c.get("env", [])
            names = [e["name"] for e in env]
            if "PIPEQ_REDIS_URL" not in names:
                continue
            users += 1
            url = env[names.index("PIPEQ_REDIS_URL")]["value"]
            parts = urlsplit(url)
            m = re.fullmatch(r"\$\((\w+)\)", parts.password or "")
            assert m, f"{where}: PIPEQ_REDIS_URL's password is not $(VAR): {url}"
            var = m.group(1)
            # Kubernetes expands $(VAR) only from a variable defined before it
            assert var in names[: names.index("PIPEQ_REDIS_URL")], f"{where}: {var} after"
            ref = env[names.index(var)]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == REDIS_SECRET, where
            svc = services[parts.hostname or ""]
            assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"
            assert parts.port in [p["port"] for p in svc["spec"]["ports"]]
    assert users >= len(toml_deployments()) + 2  # workers, Flower, the exporter


def test_redis_persists_and_requires_the_password() -> None:
    (sts,) = of_kind(BASE, "StatefulSet")
    (c,) = pod_spec(sts)["containers"]
    script = " ".join(argv(c))
    assert "--appendonly yes" in script and "--maxmemory-policy noeviction" in script
    env = env_of(c)
    m = re.search(r"requirepass \$\{?(\w+)\}?", script)
    assert m, "redis-server without requirepass"
    ref = env[m.group(1)]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == REDIS_SECRET
    # the probes authenticate, and a NOAUTH answer (exit 0) is not taken for health
    ref = env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == REDIS_SECRET
    for kind in ("readinessProbe", "livenessProbe"):
        assert "redis-cli ping | grep -q PONG" in " ".join(c[kind]["exec"]["command"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]


def test_every_secret_has_its_create_command_in_the_docs() -> None:
    """The Secrets are created by hand (no password in git): deploy/README.md gives a
    `kubectl create secret generic NAME --from-literal=KEY=...` for each one used."""
    documented = set(
        re.findall(
            r"kubectl create secret generic ([\w-]+)\s.*?--from-literal=(\w+)=",
            DOCS.read_text(),
        )
    )
    used = {ref for _, ref in secret_refs()}
    assert REDIS_SECRET in used and ("pipeq-flower-auth", "auth") in used
    assert used == documented, f"used {sorted(used)}, documented {sorted(documented)}"


def test_flower() -> None:
    (d,) = [w for w in of_kind(BASE, "Deployment") if name(w) == "pipeq-flower"]
    (c,) = pod_spec(d)["containers"]
    assert argv(c)[:4] == ["celery", "-A", "pipeq._flower", "flower"]
    ref = env_of(c)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("pipeq-flower-auth", "auth")
    for svc in of_kind(BASE, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "nothing exposed outside"


def test_exporter_is_scraped() -> None:
    (d,) = [w for w in of_kind(BASE, "Deployment") if name(w) == "pipeq-exporter"]
    (c,) = pod_spec(d)["containers"]
    cmd = argv(c)
    assert cmd[:2] == ["pipeq", "exporter"]
    port = int(cmd[cmd.index("--port") + 1])
    (svc,) = [s for s in of_kind(BASE, "Service") if name(s) == "pipeq-exporter"]
    notes = svc["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port
    assert {"name": "metrics", "containerPort": port} in c["ports"]
    (mon,) = of_kind(EVERY, "ServiceMonitor")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in mon["spec"]["endpoints"]] == [
        p["name"] for p in svc["spec"]["ports"]
    ]


# --- no root ---------------------------------------------------------------------------


def test_no_container_runs_as_root() -> None:
    checked = 0
    for w in workloads(EVERY):
        pod = pod_spec(w).get("securityContext", {})
        for c in containers(w):
            ctx = {**pod, **c.get("securityContext", {})}
            where = f"{name(w)}/{c['name']}"
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            # a numeric user: the kubelet cannot check a name such as the image's nobody
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, where
            assert ctx.get("runAsGroup", 1) != 0, where
            assert not ctx.get("privileged"), where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            checked += 1
    assert checked >= len(toml_deployments()) + 3
    # the model cache is writable by the workers' user
    for d in workers().values():
        assert (
            pod_spec(d)["securityContext"]["fsGroup"]
            == pod_spec(d)["securityContext"]["runAsGroup"]
        )


# --- KEDA ------------------------------------------------------------------------------


def test_one_scaled_object_per_worker_deployment() -> None:
    declared = toml_deployments()
    by_target = {}
    for obj in KEDA:
        assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
        spec = obj["spec"]
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        assert target.get("apiVersion", "apps/v1") == "apps/v1"
        assert target["name"] not in by_target, f"two ScaledObjects for {target['name']}"
        by_target[target["name"]] = obj
    served = workers()
    assert set(by_target) == {name(d) for d in served.values()}
    for dep_name, d in served.items():
        obj = by_target[name(d)]
        spec = obj["spec"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert "pipeq_queue_depth" in query
        assert set(re.findall(r'deployment="([^"]+)"', query)) == {dep_name}
        assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        # generators holding a GPU may scale to zero; the small classifier stays at 1
        expected_min = 0 if is_gpu(declared[dep_name]) else 1
        assert spec["minReplicaCount"] == expected_min, name(obj)
        # at zero workers the deployment must still take jobs, or KEDA never sees a
        # backlog to scale up on (producers would get NoLiveWorker)
        if spec["minReplicaCount"] == 0:
            assert declared[dep_name].get("scale_to_zero") is True, dep_name


# --- kubectl kustomize ---------------------------------------------------------------


def kustomize(directory: Path) -> list[Obj]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not on PATH: the kustomizations are checked by the tests above")
    proc = subprocess.run(
        [exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def test_kubectl_kustomize_renders_what_the_tests_read() -> None:
    rendered = kustomize(K8S)
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    (cm,) = of_kind(rendered, "ConfigMap")
    assert re.fullmatch(r"pipeq-config-[a-z0-9]+", name(cm))  # the content's hash
    assert cm["data"] == generated_configmaps(K8S)[0]["data"]
    assert sorted(map(key, rendered)) == sorted(
        (o["kind"], name(cm) if o["kind"] == "ConfigMap" else name(o)) for o in BASE
    )
    for obj in rendered:
        assert obj["metadata"]["labels"].items() >= PART_OF.items()
        if obj["kind"] != "ConfigMap":
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # the workers mount the ConfigMap under its hashed name
    for d in of_kind(rendered, "Deployment"):
        names = [v["configMap"]["name"] for v in pod_spec(d)["volumes"] if "configMap" in v]
        assert names in ([], [name(cm)]), names
    keda = kustomize(KEDA_DIR)
    assert sorted(map(key, keda)) == sorted(map(key, KEDA))
