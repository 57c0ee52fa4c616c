"""Static checks of docker/: Kubernetes manifests, compose stack, Grafana dashboard, Dockerfiles.

Offline and fast (CI runs them). The Kubernetes overlays are rendered here in Python (base +
strategic-merge patches + image overrides: the subset of kustomize that docker/k8s uses), checked
against ``kubectl kustomize`` where kubectl exists, and validated against the Kubernetes JSON
schemas bundled in ``kubernetes-validate``; the KServe InferenceServices (docker/k8s/kserve) against
KServe's own CRD schema, vendored beside this file. The end-to-end check with a Docker engine is
``scripts/docker_check.sh`` (not run by CI).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
COMPOSE_FILE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "compose.gpu.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "maskrcnn-serve.json"
# Oldest and newest Kubernetes whose schemas kubernetes-validate bundles (1.25 .. its latest).
K8S_VERSIONS = ("1.25", kubernetes_validate.utils.latest_version())
SERVICE_PORT = 8000
SETTINGS_ENV = {f"MASKRCNN_{name.upper()}" for name in Settings.model_fields}
KSERVE = K8S / "kserve"
KSERVE_VARIANTS = ("cpu", "gpu")
# KServe's InferenceService schema (v1beta1), from its published CRD; the file says where from.
KSERVE_SCHEMA = Path(__file__).with_name("kserve_inferenceservice_v1beta1.schema.json")


# ---- a small kustomize: resources, strategic-merge patches, images ---------------------------

# Lists that Kubernetes' strategic merge merges item by item, and the key it matches items on;
# every other list in a patch replaces the list it patches.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def strategic_merge(base: Any, patch: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:  # a null in a patch deletes the field
            merged.pop(key, None)
        elif key in merged and key in MERGE_KEYS and isinstance(value, list):
            merged[key] = _merge_list(merged[key], value, MERGE_KEYS[key])
        elif key in merged:
            merged[key] = strategic_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_list(base: list[dict], patch: list[dict], key: str) -> list[dict]:
    merged = [copy.deepcopy(item) for item in base]
    for item in patch:
        same = [i for i, old in enumerate(merged) if old[key] == item[key]]
        if same:
            merged[same[0]] = strategic_merge(merged[same[0]], item)
        else:
            merged.append(copy.deepcopy(item))
    return merged


def _identity(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "InferenceService":  # KServe's predictor is a pod spec with its own fields
        return [doc["spec"]["predictor"]]
    return []


def render(folder: Path) -> dict[tuple[str, str], dict]:
    """The objects a kustomization folder renders to, by (kind, name)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}: this renderer does not know {sorted(unknown)}; extend it with the manifests"
    objects: dict[tuple[str, str], dict] = {}
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs = render(path).values() if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        for doc in docs:
            assert _identity(doc) not in objects, f"{path}: duplicate {_identity(doc)}"
            objects[_identity(doc)] = doc
    for patch_ref in kustomization.get("patches", []):
        patch = yaml.safe_load((folder / patch_ref["path"]).read_text())
        assert _identity(patch) in objects, f"{folder / patch_ref['path']} patches nothing: {_identity(patch)}"
        objects[_identity(patch)] = strategic_merge(objects[_identity(patch)], patch)
    for override in kustomization.get("images", []):
        for doc in objects.values():
            for spec in _pod_specs(doc):
                for container in spec.get("initContainers", []) + spec["containers"]:
                    if re.split(r"[:@]", container["image"])[0] == override["name"]:
                        container["image"] = f"{override.get('newName', override['name'])}:{override['newTag']}"
    return objects


def canonical(value: Any) -> Any:
    """Order-free form for comparing renderings (kustomize reorders merged list items)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        if all(isinstance(v, dict) for v in items):
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
        return items
    return value


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def _deployment(objects: dict) -> dict:
    return objects["Deployment", "maskrcnn-serve"]


def _container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] + pod_spec.get("initContainers", []) if c["name"] == name)


def _env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ---- Kubernetes ---------------------------------------------------------------------------------

def test_overlays_exist():
    assert OVERLAYS == ["cpu", "gpu"]


def test_every_manifest_parses():
    for path in sorted(K8S.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), f"{path}: a document without apiVersion/kind"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_objects_match_kubernetes_schemas(overlay, version):
    name, objects = overlay
    assert {kind for kind, _ in objects} == {"Deployment", "Service", "HorizontalPodAutoscaler",
                                             "PersistentVolumeClaim", "Job"}
    for (kind, obj_name), doc in objects.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"overlay {name}: {kind}/{obj_name} breaks the Kubernetes {version} schema at {path}: {exc.message}")


def test_schema_validation_catches_mistakes():
    """The validator is strict: an unknown or mistyped field fails (guards the test above)."""
    deployment = _deployment(render(K8S / "overlays" / "cpu"))
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_python_rendering_matches_kubectl_kustomize(overlay):
    name, objects = overlay
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / name)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    by_kubectl = {_identity(d): d for d in yaml.safe_load_all(out) if d}
    assert canonical(by_kubectl) == canonical(objects)


def test_deployment_probes_ports_and_resources(overlay):
    name, objects = overlay
    pod = _deployment(objects)["spec"]["template"]
    server = _container(pod["spec"], "maskrcnn-serve")
    assert server["ports"] == [{"name": "http", "containerPort": SERVICE_PORT}]
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    resources = server["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert server["image"] == f"maskrcnn-serve:{name}"
    assert ("nvidia.com/gpu" in resources["limits"]) == (name == "gpu")
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(SERVICE_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_environment_names_are_service_settings(overlay):
    _, objects = overlay
    for spec in _pod_specs(_deployment(objects)):
        for container in spec["containers"] + spec.get("initContainers", []):
            unknown = {k for k in _env(container) if k.startswith("MASKRCNN_")} - SETTINGS_ENV
            assert not unknown, f"{container['name']}: {sorted(unknown)} are not service settings"


def test_engine_artifact_is_shared_read_only(overlay):
    _, objects = overlay
    pod_spec = _deployment(objects)["spec"]["template"]["spec"]
    claim = next(v for v in pod_spec["volumes"] if v["name"] == "artifacts")["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert ("PersistentVolumeClaim", claim["claimName"]) in objects
    engine_dirs = set()
    for name in ("maskrcnn-serve", "wait-for-engine"):
        container = _container(pod_spec, name)
        mount = next(m for m in container["volumeMounts"] if m["name"] == "artifacts")
        assert mount["readOnly"] is True
        engine_dirs.add(_env(container)["MASKRCNN_ENGINE_DIR"])
    job_spec = objects["Job", "maskrcnn-build-engine"]["spec"]["template"]["spec"]
    builder = _container(job_spec, "build-engine")
    assert next(v for v in job_spec["volumes"] if v["name"] == "artifacts")["persistentVolumeClaim"]["claimName"] == claim["claimName"]
    job_env = _env(builder)
    mount_path = next(m for m in builder["volumeMounts"] if m["name"] == "artifacts")["mountPath"]
    assert job_env["ARTIFACTS"] == mount_path
    assert engine_dirs == {f"{mount_path}/{job_env['ENGINE_NAME']}"}, "the Job builds where the pods look"


def test_service_and_autoscaler_target_the_deployment(overlay):
    name, objects = overlay
    deployment = _deployment(objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = objects["Service", "maskrcnn-serve"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in _container(deployment["spec"]["template"]["spec"], "maskrcnn-serve")["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    hpa = objects["HorizontalPodAutoscaler", "maskrcnn-serve"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "maskrcnn-serve"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    for metric in hpa["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in exposed_metric_names()
    assert [m["type"] for m in hpa["metrics"]] == (["Resource"] if name == "cpu" else ["Pods"])


# ---- KServe InferenceService -----------------------------------------------------------------------

def _strict(schema: Any) -> Any:
    """The CRD schema as ``kubectl apply --validate=strict`` reads it: an object with listed properties
    takes no others (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def kserve_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(json.loads(KSERVE_SCHEMA.read_text())["openAPIV3Schema"]))


@pytest.fixture(scope="module", params=KSERVE_VARIANTS)
def inference_service(request: pytest.FixtureRequest) -> tuple[str, dict]:
    objects = render(KSERVE / request.param)
    assert list(objects) == [("InferenceService", "maskrcnn")]
    return request.param, objects["InferenceService", "maskrcnn"]


def _kserve_problems(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    try:  # the CRD leaves metadata to Kubernetes: check it as any object's
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     K8S_VERSIONS[-1], strict=True)
    except kubernetes_validate.ValidationError as exc:
        problems.append(f"metadata: {exc.message}")
    return problems


def test_inference_services_match_kserves_crd_schema(inference_service, kserve_validator):
    name, doc = inference_service
    assert not _kserve_problems(kserve_validator, doc), f"kserve/{name}: {_kserve_problems(kserve_validator, doc)}"


@pytest.mark.parametrize("mistake", [
    lambda d: d["spec"]["predictor"]["containers"][0].update(readinessProbes={}),   # typo
    lambda d: d["spec"]["predictor"].update(minReplicas="two"),                      # wrong type
    lambda d: d["spec"]["predictor"].update(scaleMetric="queue"),                    # not in the enum
    lambda d: d["spec"].update(predictors=d["spec"].pop("predictor")),               # required field missing
    lambda d: d["metadata"].update(annotation={}),                                   # typo in metadata
])
def test_kserve_schema_validation_catches_mistakes(kserve_validator, mistake):
    doc = copy.deepcopy(render(KSERVE / "cpu")["InferenceService", "maskrcnn"])
    mistake(doc)
    assert _kserve_problems(kserve_validator, doc)


def _quantity_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", value).groups()
    return int(number) * 2 ** (10 * ("KMGT".index(unit[0]) + 1) if unit else 0)


def test_inference_service_serves_v2_on_our_ports_probes_and_engine(inference_service):
    name, doc = inference_service
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"  # two ports
    predictor = doc["spec"]["predictor"]
    (server,) = predictor["containers"]
    assert server["name"] == "kserve-container" and server["image"] == f"maskrcnn-serve:{name}"
    env = _env(server)
    assert env["PROTOCOL"] == "v2"
    unknown = {k for k in env if k not in ("PROTOCOL", "STORAGE_URI")} - SETTINGS_ENV
    assert not unknown, f"{sorted(unknown)} are not service settings"
    settings = Settings(**{k.removeprefix("MASKRCNN_").lower(): v for k, v in env.items()
                           if k.startswith("MASKRCNN_") and isinstance(v, str) and k != "MASKRCNN_ENGINE_DIR"})
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port} == {"http": 8080, "grpc": 8081}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert predictor["annotations"]["prometheus.io/port"] == str(settings.port)
    # the engine: the folder the plain deployment's Job builds on its PVC, mounted by KServe at /mnt/models
    job = render(K8S / "overlays" / name)["Job", "maskrcnn-build-engine"]["spec"]["template"]["spec"]
    claim = next(v for v in job["volumes"] if v["name"] == "artifacts")["persistentVolumeClaim"]["claimName"]
    assert env["STORAGE_URI"] == f"pvc://{claim}/{_env(_container(job, 'build-engine'))['ENGINE_NAME']}"
    assert env["MASKRCNN_ENGINE_DIR"] == "/mnt/models"
    assert predictor["securityContext"]["runAsNonRoot"] is True


def test_inference_service_resources_hold_the_memory_budget_and_scale(inference_service):
    name, doc = inference_service
    predictor = doc["spec"]["predictor"]
    server = predictor["containers"][0]
    limits, requests = server["resources"]["limits"], server["resources"]["requests"]
    # the budget is the default rule's quarter of the memory limit, written out
    budget = int(_env(server)["MASKRCNN_MEMORY_BUDGET_BYTES"])
    assert budget * 4 == _quantity_bytes(limits["memory"]) and _quantity_bytes(requests["memory"]) >= budget
    assert ("nvidia.com/gpu" in limits) == (name == "gpu")
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    autoscaler = doc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"]
    if name == "cpu":
        assert (autoscaler, predictor["scaleMetric"], "autoScaling" in predictor) == ("hpa", "cpu", False)
        assert 0 < predictor["scaleTarget"] <= 100
    else:
        assert (autoscaler, "scaleMetric" in predictor) == ("keda", False)
        (metric,) = predictor["autoScaling"]["metrics"]
        query = metric["external"]["metric"]["query"]
        # namespace and pod: the target labels of Prometheus' usual Kubernetes pod discovery
        scraped = {sample: labels | {"namespace", "pod"} for sample, labels in exposed_metric_names().items()}
        assert not promql_problems(query, scraped), query
        assert "maskrcnn_queue_depth" in query and metric["external"]["target"]["type"] == "AverageValue"


# ---- metric names (service/metrics.py) -----------------------------------------------------------

# Sample-name suffixes of each metric type in the Prometheus text format.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "info": ("_info",), "summary": ("", "_count", "_sum", "_created")}


def _service_metrics() -> list[MetricWrapperBase]:
    return [m for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)]


def exposed_metric_names() -> dict[str, set[str]]:
    """Every sample name the service exposes -> the labels its samples carry."""
    names: dict[str, set[str]] = {}
    for metric in _service_metrics():
        for family in metric.describe():
            labels = set(metric._labelnames)
            for suffix in SUFFIXES[family.type]:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_exposed_metric_names_cover_the_service():
    names = exposed_metric_names()
    assert {"maskrcnn_requests_total", "maskrcnn_stage_seconds_bucket", "maskrcnn_batch_size_sum",
            "maskrcnn_queue_depth", "maskrcnn_engine_info"} <= set(names)
    assert names["maskrcnn_stage_seconds_bucket"] == {"stage", "le"}


# ---- Grafana ------------------------------------------------------------------------------------

PROMQL_FUNCTIONS = {"sum", "rate", "histogram_quantile", "vector"}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_provisioned_against_the_compose_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/maskrcnn-serve.yml").read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "latency by stage", "batch size", "queue depth", "errors"):
        assert topic in titles


def promql_problems(expr: str, names: dict[str, set[str]]) -> list[str]:
    """What in a dashboard query names a metric, label or function the service does not have."""
    names = {**names, "up": {"instance", "job"}}  # `up`: Prometheus' own, one per scrape target
    used = set(re.findall(r"\b(maskrcnn_\w+|up)\b", expr))
    problems = [f"metric {n} is not exposed by service/metrics.py" for n in sorted(used - set(names))]
    if not used:
        problems.append("no metric")
    allowed = set().union(*(names.get(n, set()) for n in used)) | {"instance", "job"}
    grouped = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
    matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    problems += [f"label {label} does not exist" for label in sorted((grouped | matched) - allowed)]
    functions = set(re.findall(r"\b([a-z_]+)\s*\(", expr)) - {"by"}
    problems += [f"unexpected function {f}" for f in sorted(functions - PROMQL_FUNCTIONS)]
    return problems


def test_dashboard_queries_use_only_exposed_metrics_and_labels():
    names = exposed_metric_names()
    for title, expr in _dashboard_exprs():
        assert not promql_problems(expr, names), f"{title}: {promql_problems(expr, names)} in {expr}"


@pytest.mark.parametrize("expr", [
    "rate(maskrcnn_request_total[1m])",                                 # misspelt metric
    "maskrcnn_stage_seconds{stage=\"total\"}",                           # histogram without suffix
    "sum by (le, phase) (rate(maskrcnn_stage_seconds_bucket[1m]))",     # label that does not exist
    "sum by (le) (rate(maskrcnn_batch_size_bucket{stage=\"total\"}[1m]))",  # another metric's label
    "avg_over_time(maskrcnn_queue_depth[1m])",                          # function outside the known set
])
def test_dashboard_query_check_catches_mistakes(expr):
    assert promql_problems(expr, exposed_metric_names())


# ---- compose --------------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _default(value: str) -> str:
    """``${VAR:-default}`` -> default (what compose substitutes when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_services_and_dependencies():
    services = _compose()["services"]
    assert set(services) == {"builder", "maskrcnn", "nginx", "prometheus", "grafana"}
    assert services["maskrcnn"]["depends_on"] == {"builder": {"condition": "service_completed_successfully"}}
    assert services["nginx"]["depends_on"] == {"maskrcnn": {"condition": "service_healthy"}}
    assert int(_default(str(services["maskrcnn"]["deploy"]["replicas"]))) >= 2
    assert services["builder"]["build"]["target"] == "builder" and services["maskrcnn"]["build"]["target"] == "runtime"
    for name, service in services.items():
        assert re.fullmatch(r"\$\{\w+_IMAGE:-[^}]+\}", service["image"]), f"{name}: image not overridable"
        for port in service.get("ports", []):
            assert _default(port).startswith("127.0.0.1:"), f"{name}: {port} is not on loopback by default"


def test_compose_shares_one_artifact_volume_read_only():
    compose = _compose()
    services = compose["services"]
    builder_mount = next(v for v in services["builder"]["volumes"] if v.endswith(":/artifacts"))
    replica_mount = next(v for v in services["maskrcnn"]["volumes"] if ":/artifacts" in v)
    assert replica_mount == builder_mount + ":ro"
    assert _default(builder_mount.split(":/")[0]) in compose["volumes"]
    engine_dir = next(e for e in services["maskrcnn"]["environment"] if e.startswith("MASKRCNN_ENGINE_DIR="))
    assert _default(engine_dir) == f"MASKRCNN_ENGINE_DIR=/artifacts/{_default(services['builder']['environment']['ENGINE_NAME'])}"


def test_compose_passes_only_service_settings():
    names = {e.split("=")[0] for e in _compose()["services"]["maskrcnn"]["environment"]}
    assert names <= SETTINGS_ENV, sorted(names - SETTINGS_ENV)


def test_compose_bind_mounts_exist():
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"


def test_load_balancer_and_prometheus_find_the_replicas():
    nginx = (DOCKER / "nginx/nginx.conf").read_text()
    assert re.search(rf"set \$replicas maskrcnn:{SERVICE_PORT};", nginx)
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in nginx
    listen = re.search(r"listen (\d+);", nginx).group(1)
    assert any(_default(p).endswith(f":{listen}") for p in _compose()["services"]["nginx"]["ports"])
    prometheus = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "maskrcnn")
    assert job["dns_sd_configs"] == [{"names": ["maskrcnn"], "type": "A", "port": SERVICE_PORT, "refresh_interval": "5s"}]
    assert json.loads(DASHBOARD.read_text())["panels"][0]["targets"][0]["expr"] == 'sum(up{job="maskrcnn"})'


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_gpu_override_reserves_a_gpu_per_replica():
    override = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(override) == {"maskrcnn"}
    replica = override["maskrcnn"]
    assert replica["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert _default(replica["build"]["args"]["ONNXRUNTIME"]) == "onnxruntime-gpu"
    assert _default(replica["image"]).endswith(":gpu")


@pytest.mark.skipif(_compose_cli() is None, reason="neither docker compose nor docker-compose installed")
@pytest.mark.parametrize("files", [[COMPOSE_FILE], [COMPOSE_FILE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_compose_files_are_valid_for_docker_compose(files):
    args = [a for f in files for a in ("-f", str(f))]
    result = subprocess.run([*_compose_cli(), *args, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- Dockerfiles and scripts -------------------------------------------------------------------------

def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions per stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#")))
    stages: dict[str, list[str]] = {}
    current = None
    for line in filter(None, (l.strip() for l in text.splitlines())):
        match = re.match(r"FROM (\S+)(?: AS (\S+))?", line)
        if match:
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def _lineage(stages: dict[str, list[str]], name: str) -> list[str]:
    parent = stages[name][0].split()[1]
    return [*(_lineage(stages, parent) if parent in stages else []), name]


def test_runtime_image_is_small_non_root_and_torch_free():
    stages = _stages(DOCKER / "Dockerfile")
    assert set(stages) == {"base", "venv", "builder", "runtime"}
    assert stages["base"][0] == "FROM ${BASE_IMAGE} AS base"
    assert list(stages)[-1] == "runtime", "runtime must be the default (last) target"
    runtime = " ".join(stages["runtime"])
    assert "USER maskrcnn" in runtime and "HEALTHCHECK" in runtime and '"maskrcnn-serve"' in runtime
    assert "/readyz" in runtime
    assert "COPY --from=venv /opt/venv /opt/venv" in runtime
    installed = " ".join(" ".join(stages[s]) for s in _lineage(stages, "runtime"))
    for forbidden in ("torch", "[build]", "build-essential", "gcc"):
        assert forbidden not in installed, f"{forbidden} in the runtime image's stages"
    assert "[build]" in " ".join(stages["builder"])


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "debian-packages.Dockerfile"])
def test_dockerfiles_take_the_base_image_as_argument_and_copy_what_exists(dockerfile):
    stages = _stages(DOCKER / dockerfile)
    first = next(iter(stages.values()))[0]
    assert first.startswith("FROM ${BASE_IMAGE}"), first
    for stage in stages.values():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
