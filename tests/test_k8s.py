"""deploy/k8s: rendered offline (tests/k8s_render.py, checked against `kubectl kustomize` where
kubectl is installed), validated against the Kubernetes JSON schemas (kubernetes-validate) and,
for the CRDs, against schemas written from their CRDs' required fields; then checked against
the service's own facts (routes, settings, metrics, the image's user), and the autoscaling
query run on a real Prometheus scraping a real `sgz serve`."""

import asyncio
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate as kv
import pytest
import yaml
from k8s_render import containers, render
from k8s_support import (
    CRD_SCHEMAS,
    Redis,
    hold_requests,
    prometheus_value,
    quantity,
    redis_command,
    release,
    start_prometheus,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# the oldest Kubernetes still commonly run, and the newest the validator knows
K8S_VERSIONS = ("1.30", ".".join(kv.latest_version().split(".")[:2]))


def api_key_variant(tmp: Path) -> Path:
    """The CPU overlay with the api-key component, as the docs tell users to add it."""
    rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(K8S / "overlays" / "cpu")],
                "components": [rel(K8S / "components" / "api-key")],
            }
        )
    )
    return tmp


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    return {
        "base": K8S / "base",
        **{o: K8S / "overlays" / o for o in OVERLAYS},
        "cpu+api-key": api_key_variant(tmp_path_factory.mktemp("k8s")),
    }


@pytest.fixture(scope="module")
def rendered(variants) -> dict[str, list[dict]]:
    return {name: render(path) for name, path in variants.items()}


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def container(objects: list[dict], deployment: str = "sgz-serve", name: str = "sgz") -> dict:
    pod = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def literal_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def settings_from(env: dict[str, str], monkeypatch):
    """The service's Settings as the pod would build them from this environment."""
    from service.settings import Settings

    for name in [n for n in os.environ if n.upper().startswith("SGZ_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def key(o: dict) -> tuple:
    return o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]


# --- rendering and schemas ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", *OVERLAYS, "cpu+api-key"])
def test_the_test_renderer_agrees_with_kubectl_kustomize(variant, variants, rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: the manifests are checked with the test renderer alone")
    out = subprocess.run(
        [kubectl, "kustomize", str(variants[variant])], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = {key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    mine = {key(o): o for o in rendered[variant]}
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k] == theirs[k], k


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", [*OVERLAYS, "cpu+api-key"])
def test_core_objects_validate_against_the_kubernetes_schemas(variant, version, rendered):
    core = [o for o in rendered[variant] if o["kind"] not in CRD_SCHEMAS]
    assert {o["kind"] for o in core} == {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for o in core:  # strict: an unknown (misspelt) field is an error too
        kv.validate(o, version, strict=True)


def test_the_schemas_reject_what_the_cluster_would(rendered):
    broken = yaml.safe_load(yaml.safe_dump(one(rendered["cpu"], "Deployment", "sgz-serve")))
    broken["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSIONS[-1], strict=True)
    so = yaml.safe_load(yaml.safe_dump(one(rendered["cpu"], "ScaledObject", "sgz-serve")))
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 8  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, CRD_SCHEMAS["ScaledObject"])


@pytest.mark.parametrize("variant", [*OVERLAYS, "cpu+api-key"])
def test_custom_resources_validate(variant, rendered):
    for kind, schema in CRD_SCHEMAS.items():
        jsonschema.validate(one(rendered[variant], kind, "sgz-serve"), schema)
    # the HorizontalPodAutoscaler KEDA makes of the ScaledObject, against the core schema
    so = one(rendered[variant], "ScaledObject", "sgz-serve")["spec"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-sgz-serve", "namespace": "sgz"},
        "spec": {
            "scaleTargetRef": so["scaleTargetRef"],
            "minReplicas": so["minReplicaCount"],
            "maxReplicas": so["maxReplicaCount"],
            "behavior": so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": "s0-prometheus"},
                        "target": {
                            "type": t["metricType"],
                            "averageValue": t["metadata"]["threshold"],
                        },
                    },
                }
                for t in so["triggers"]
            ],
        },
    }
    for version in K8S_VERSIONS:
        kv.validate(hpa, version, strict=True)
    assert 1 <= so["minReplicaCount"] <= so["fallback"]["replicas"] <= so["maxReplicaCount"]


# --- the service's own facts ----------------------------------------------------------------


async def statuses(app, paths) -> dict[str, int]:
    """GET each path through the app's routing, without its lifespan (no model loaded:
    /readyz answers 503, never 404)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sgz") as client:
        return {path: (await client.get(path)).status_code for path in paths}


@pytest.mark.parametrize("variant", OVERLAYS)
def test_probes_and_ports_are_the_service_s(variant, rendered, monkeypatch):
    from service.app import create_app
    from service.middleware import OPEN_PATHS

    objects = rendered[variant]
    c = container(objects)
    settings = settings_from(literal_env(c), monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.port}
    assert settings.host == "0.0.0.0"
    endpoint = one(objects, "ServiceMonitor", "sgz-serve")["spec"]["endpoints"][0]
    paths = {c[kind]["httpGet"]["path"] for kind in PROBES} | {endpoint["path"], "/nowhere"}
    status = asyncio.run(statuses(create_app(settings), paths))
    routed = lambda path: status[path] != 404  # noqa: E731
    probes = {kind: c[kind]["httpGet"] for kind in PROBES}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert routed(probe["path"]) and probe["port"] in ports
        assert probe["path"] in OPEN_PATHS  # the kubelet sends no API key
    service = one(objects, "Service", "sgz-serve")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service] == [(settings.port, "http")]
    assert routed(endpoint["path"]) and endpoint["port"] == "http"
    assert not routed("/nowhere")
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model + CUDA load


@pytest.mark.parametrize("variant", OVERLAYS)
def test_environment_is_the_service_s_settings(variant, rendered, monkeypatch):
    from service.settings import Settings, unknown_variables

    objects = rendered[variant]
    c = container(objects)
    names = {e["name"] for e in c["env"]}
    assert unknown_variables({n: "" for n in names}) == []  # every SGZ_* is a setting
    assert "SGZ_API_KEY" in names and "api_key" in Settings.model_fields
    env = literal_env(c)
    settings = settings_from(env, monkeypatch)  # every value parses
    pod = one(objects, "Deployment", "sgz-serve")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False  # would add SGZ_REDIS_PORT=tcp://...
    # the drain: preStop, then up to shutdown_timeout_s, then the lifespan's shutdown
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= (
        pre_stop + max(settings.shutdown_timeout_s, settings.shutdown_grace_s) + 5
    )
    # thread pools sized to the CPU limit, not to the node's cores
    cpus = quantity(c["resources"]["limits"]["cpu"])
    assert (
        settings.io_threads == int(env["OMP_NUM_THREADS"]) == int(env["NUMBA_NUM_THREADS"]) == cpus
    )
    # the jobs' files fit their volume, or the kubelet would evict the pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    jobs = volumes[mounts[str(settings.jobs_dir)]]["emptyDir"]
    assert quantity(jobs["sizeLimit"]) > settings.max_jobs_disk_bytes


def test_every_path_written_is_a_volume(rendered, monkeypatch):
    objects = rendered["gpu"]
    pod = one(objects, "Deployment", "sgz-serve")["spec"]["template"]["spec"]
    c = container(objects)
    env = literal_env(c)
    settings = settings_from({k: v for k, v in env.items() if k.startswith("SGZ_")}, monkeypatch)
    written = [
        "/tmp",
        str(settings.jobs_dir),
        env["NUMBA_CACHE_DIR"],
        env["TRITON_CACHE_DIR"],
        env["HOME"],
    ]
    mounted = [m["mountPath"] for m in c["volumeMounts"]]
    for path in written:
        assert any(path == m or path.startswith(m + "/") for m in mounted), path
    # the init container copies the image's numba cache (docker/Dockerfile) into the volume
    init = pod["initContainers"][0]
    baked = re.search(r"NUMBA_CACHE_DIR=(\S+)", (ROOT / "docker" / "Dockerfile").read_text())[1]
    assert init["image"] == c["image"]
    assert init["command"][-2].rstrip("/.") == baked
    assert init["command"][-1].rstrip("/") == env["NUMBA_CACHE_DIR"]
    assert {m["name"] for m in init["volumeMounts"]} <= {m["name"] for m in c["volumeMounts"]}


def dockerfile_uid() -> int:
    return int(re.search(r"useradd .*--uid (\d+)", (ROOT / "docker" / "Dockerfile").read_text())[1])


@pytest.mark.parametrize("variant", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(variant, rendered):
    objects = rendered[variant]
    namespace = one(objects, "Namespace", "sgz")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in ("sgz-serve", "sgz-redis"):
        deployment = one(objects, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert all("emptyDir" in v for v in pod["volumes"])
        for c in containers(deployment):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(
                c["resources"]["limits"]
            )
    serve = one(objects, "Deployment", "sgz-serve")["spec"]["template"]["spec"]
    assert serve["securityContext"]["runAsUser"] == dockerfile_uid()
    assert "command" not in container(objects) and "args" not in container(objects)


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("variant", OVERLAYS)
def test_objects_point_at_each_other(variant, rendered):
    objects = rendered[variant]
    serve, redis = (one(objects, "Deployment", n) for n in ("sgz-serve", "sgz-redis"))
    serve_labels = serve["spec"]["template"]["metadata"]["labels"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    svc, redis_svc = (one(objects, "Service", n) for n in ("sgz-serve", "sgz-redis"))
    assert svc["spec"]["selector"].items() <= serve_labels.items()
    assert redis_svc["spec"]["selector"].items() <= redis_labels.items()
    assert selects(serve["spec"]["selector"], serve_labels)
    assert selects(
        one(objects, "PodDisruptionBudget", "sgz-serve")["spec"]["selector"], serve_labels
    )
    monitor = one(objects, "ServiceMonitor", "sgz-serve")["spec"]
    assert selects(monitor["selector"], svc["metadata"]["labels"])
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    policy = one(objects, "NetworkPolicy", "sgz-redis")["spec"]
    assert selects(policy["podSelector"], redis_labels)
    assert selects(policy["ingress"][0]["from"][0]["podSelector"], serve_labels)
    # SGZ_REDIS_URL names the Redis Service and its port
    url = httpx.URL(literal_env(container(objects))["SGZ_REDIS_URL"])
    assert url.scheme == "redis" and url.host == "sgz-redis"
    assert url.port == redis_svc["spec"]["ports"][0]["port"]
    so = one(objects, "ScaledObject", "sgz-serve")["spec"]
    assert so["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sgz-serve",
    }
    assert "replicas" not in serve["spec"]  # the ScaledObject's to set
    assert len({o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}) == 1


def test_api_key_reaches_the_service_and_prometheus_from_one_secret(rendered):
    assert (
        "authorization"
        not in one(rendered["cpu"], "ServiceMonitor", "sgz-serve")["spec"]["endpoints"][0]
    )
    objects = rendered["cpu+api-key"]
    auth = one(objects, "ServiceMonitor", "sgz-serve")["spec"]["endpoints"][0]["authorization"]
    env = {e["name"]: e for e in container(objects)["env"]}
    ref = env["SGZ_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True  # no Secret: no key, the service is open
    assert auth["type"] == "Bearer"
    assert (auth["credentials"]["name"], auth["credentials"]["key"]) == (ref["name"], ref["key"])


def query_of(objects: list[dict]) -> tuple[str, float]:
    trigger = one(objects, "ScaledObject", "sgz-serve")["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    return trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])


@pytest.mark.parametrize("variant", OVERLAYS)
def test_autoscaling_query_uses_the_service_s_metrics(variant, rendered):
    from service.metrics import Metrics

    objects = rendered[variant]
    query, threshold = query_of(objects)
    families = list(Metrics().registry.collect())
    names = {f.name for f in families} | {s.name for f in families for s in f.samples}
    used = set(re.findall(r"\bsgz_[a-z_]+", query))
    assert used and used <= names, used - names
    assert "sgz_in_flight_requests" in used and threshold > 0
    # the labels the Prometheus Operator gives the scraped series: namespace, job = Service
    labels = set(re.findall(r'(\w+)="([^"]*)"', query))
    assert labels == {("namespace", "sgz"), ("job", "sgz-serve")}
    assert one(objects, "ServiceMonitor", "sgz-serve")["metadata"]["namespace"] == "sgz"


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not(rendered, monkeypatch):
    gpu, cpu = container(rendered["gpu"]), container(rendered["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].endswith(":cuda") and not cpu["image"].endswith(":cuda")
    assert settings_from(literal_env(gpu), monkeypatch).device == "cuda"
    assert settings_from(literal_env(cpu), monkeypatch).device is None  # cpu: no GPU seen
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    pod = one(rendered["gpu"], "Deployment", "sgz-serve")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    cpu_pod = one(rendered["cpu"], "Deployment", "sgz-serve")["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_pod and "nodeSelector" not in cpu_pod


# --- real Redis, real Prometheus, real service ----------------------------------------------


def redis_args(objects: list[dict]) -> list[str]:
    args = container(objects, "sgz-redis", "redis")["args"]
    assert args[0] == "redis-server"
    return args[1:]


def test_redis_runs_with_the_manifest_s_memory_cap(rendered, tmp_path, monkeypatch):
    objects = rendered["cpu"]
    settings = settings_from(literal_env(container(objects)), monkeypatch)
    redis = Redis(redis_args(objects), tmp_path)
    try:
        config = dict(zip(*[iter(redis_command(redis.port, "CONFIG", "GET", "*"))] * 2))
    finally:
        redis.close()
    maxmemory = int(config["maxmemory"])
    # a backstop behind the store's own byte budget, evicting only maps (they have a TTL),
    # never the store's index (service/redis_store.py)
    assert maxmemory >= 2 * settings.factor_store_bytes
    assert config["maxmemory-policy"] == "volatile-ttl"
    assert config["save"] == "" and config["appendonly"] == "no"
    limit = container(objects, "sgz-redis", "redis")["resources"]["limits"]["memory"]
    assert quantity(limit) >= 1.25 * maxmemory  # room for Redis itself and fragmentation


@pytest.mark.slow
def test_scaling_query_counts_requests_in_flight_on_a_real_prometheus(rendered, monkeypatch):
    from sgz_server import Server

    from model.checkpoint import DEFAULT_CHECKPOINT
    from service.settings import Settings

    objects = rendered["cpu"]
    query, threshold = query_of(objects)
    so = one(objects, "ScaledObject", "sgz-serve")["spec"]
    c = container(objects)
    folder = Path(tempfile.mkdtemp(prefix="sgz-k8s-"))
    env = {k: v for k, v in literal_env(c).items() if k.startswith("SGZ_") or "THREADS" in k}
    env.update(SGZ_HOST="127.0.0.1", SGZ_JOBS_DIR=str(folder / "jobs"))
    redis = None
    if "redis_url" in Settings.model_fields:
        redis = Redis(redis_args(objects), folder)
        env["SGZ_REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
    else:
        env.pop("SGZ_REDIS_URL")
    monitor = one(objects, "ServiceMonitor", "sgz-serve")
    prometheus = held = None
    try:
        with Server(env, checkpoint=DEFAULT_CHECKPOINT) as server:
            for probe in PROBES:
                assert httpx.get(server.url + c[probe]["httpGet"]["path"]).status_code == 200
            prometheus, url = start_prometheus(
                folder,
                job="sgz-serve",
                namespace=monitor["metadata"]["namespace"],
                path=monitor["spec"]["endpoints"][0]["path"],
                target=f"127.0.0.1:{server.port}",
            )
            idle = wait_for(lambda: prometheus_value(url, query), lambda v: v is not None)
            assert idle == 0  # the scrape's own request is not load
            n = 12
            held = hold_requests(server.port, n)
            busy = wait_for(lambda: prometheus_value(url, query), lambda v: v == n)
            # the HPA's rule for an AverageValue target: ceil(total / target a replica)
            desired = min(
                max(math.ceil(busy / threshold), so["minReplicaCount"]), so["maxReplicaCount"]
            )
            assert desired == math.ceil(n / threshold) == 2
            release(held)
            assert wait_for(lambda: prometheus_value(url, query), lambda v: v == 0) == 0
    finally:
        release(held or [])
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        if redis is not None:
            redis.close()
        shutil.rmtree(folder, ignore_errors=True)
