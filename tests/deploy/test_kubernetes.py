"""The Kubernetes manifests (deploy/kubernetes) are valid resources of the Kubernetes API, and agree with the
code: images, commands, settings, probes and the scrape job the alerts expect."""
import kubernetes_validate
import pytest
import yaml

from streamadapt.settings import OPTIONS
from tests.deploy.conftest import REPO, alert_rules, compose

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
RESOURCES = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
BY_KIND = {}
for resource in RESOURCES:
    BY_KIND.setdefault(resource["kind"], {})[resource["metadata"]["name"]] = resource
KUBERNETES_VERSION = "1.33"


@pytest.mark.parametrize("resource", [r for r in RESOURCES if "coreos" not in r["apiVersion"]],
                         ids=lambda r: f"{r['kind']}/{r['metadata']['name']}")
def test_every_core_resource_is_valid_against_the_kubernetes_schema(resource):
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def container(deployment: str) -> dict:
    [only] = BY_KIND["Deployment"][deployment]["spec"]["template"]["spec"]["containers"]
    return only


def test_workers_run_the_serving_image_and_the_trainer_the_trainer_image_as_compose_builds_them():
    services = compose()["services"]
    assert container("streamadapt-worker")["image"] == services["worker"]["image"]
    assert container("streamadapt-trainer")["image"] == services["trainer"]["image"]
    assert container("streamadapt-worker")["args"] == services["worker"]["command"]
    assert container("streamadapt-trainer")["args"] == services["trainer"]["command"]
    job = BY_KIND["Job"]["streamadapt-source-model"]["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == services["source-model"]["image"]


def test_settings_are_known_and_the_probes_read_the_metrics_port():
    known = {option.env for option in OPTIONS}
    config = BY_KIND["ConfigMap"]["streamadapt"]["data"]
    assert set(config) <= known
    port = int(config["STREAMADAPT_METRICS_PORT"])
    for name in ("streamadapt-worker", "streamadapt-trainer"):
        spec = container(name)
        assert [p["containerPort"] for p in spec["ports"] if p["name"] == "metrics"] == [port]
        assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert {"configMapRef": {"name": "streamadapt"}} in spec["envFrom"]
    assert container("streamadapt-worker")["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_the_pod_monitor_scrapes_every_pod_under_the_job_names_the_alerts_use():
    monitor = BY_KIND["PodMonitor"]["streamadapt"]["spec"]
    jobs = set()
    for name in ("streamadapt-worker", "streamadapt-trainer"):
        labels = BY_KIND["Deployment"][name]["spec"]["template"]["metadata"]["labels"]
        assert monitor["selector"]["matchLabels"].items() <= labels.items()
        jobs.add(labels[monitor["jobLabel"]])
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]
    alert_jobs = {job for rule in alert_rules() for job in ("streamadapt-worker", "streamadapt-trainer") if job in rule["expr"]}
    assert alert_jobs <= jobs
