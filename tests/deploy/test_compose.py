"""docker compose cannot run here, so the file is checked against the code it deploys."""
import re

from streamadapt.settings import OPTIONS, load_settings
from tests.deploy.conftest import COMPOSE, REPO, compose

REQUIRED = {"kafka", "redis", "worker", "trainer", "prometheus", "grafana"}


def test_every_required_service_is_there_with_a_healthcheck():
    services = compose()["services"]
    assert REQUIRED <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_images_are_pinned_and_kafka_is_the_official_apache_image():
    services = compose()["services"]
    for name, service in services.items():
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: {image!r}"
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper


def test_workers_scale_and_trainer_runs_its_role():
    services = compose()["services"]
    worker, trainer = services["worker"], services["trainer"]
    assert "container_name" not in worker and "ports" not in worker, "--scale worker=N needs neither"
    assert worker["command"] == ["run", "--role", "worker"]
    assert trainer["command"] == ["run", "--role", "trainer"]
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])


def test_every_streamadapt_variable_in_the_compose_file_is_a_setting_with_a_valid_value(monkeypatch):
    known = {option.env for option in OPTIONS}
    services = compose()["services"]
    seen = set()
    for name, service in services.items():
        env = service.get("environment") or {}
        streamadapt = {k: str(v) for k, v in env.items() if k.startswith("STREAMADAPT_")}
        assert set(streamadapt) <= known, f"{name}: {set(streamadapt) - known}"
        for key, value in streamadapt.items():
            monkeypatch.setenv(key, value)
        if streamadapt:
            load_settings()  # the values parse too
            for key in streamadapt:
                monkeypatch.delenv(key)
        seen |= set(streamadapt)
    assert {"STREAMADAPT_KAFKA_BOOTSTRAP", "STREAMADAPT_REDIS_URL", "STREAMADAPT_SOURCE_CHECKPOINT"} <= seen


def test_mounted_files_exist_and_redis_persists():
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    assert "--appendonly" in services["redis"]["command"]
    # as scripts/dev-stack runs it: no append-only file rewrite until the file reaches 1 GB
    assert services["redis"]["command"][services["redis"]["command"].index("--auto-aof-rewrite-min-size") + 1] == "1gb"
    assert "--auto-aof-rewrite-min-size 1gb" in (REPO / "scripts" / "dev-stack").read_text()
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in command


def test_topics_created_match_the_default_topic_settings():
    script = "\n".join(compose()["services"]["kafka-init"]["command"])
    created = set(re.findall(r"--topic (\S+)", script))
    k = load_settings().kafka
    assert created == {k.input_topic, k.predictions_topic, k.dlq_topic, k.model_versions_topic}
    assert re.search(r"--topic model-versions --partitions 1\b", script), "model versions need one ordered partition"


def test_dockerfile_is_multi_stage_non_root_and_runs_the_same_command():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["streamadapt"]' in dockerfile
    assert 'streamadapt = "streamadapt.cli:main"' in (REPO / "pyproject.toml").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, re.M))
    assert "streamadapt" in copied, "the image installs the package from its source folder"
    assert "streamadapt run" in (REPO / "scripts" / "demo").read_text()



def test_the_serving_image_has_no_tensorflow_and_the_trainer_image_has_it_from_hashed_locks():
    dockerfile = (REPO / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    assert {"serving", "trainer"} <= targets
    services = compose()["services"]
    assert services["worker"]["build"]["target"] == "serving"
    assert services["trainer"]["build"]["target"] == "trainer" and services["source-model"]["build"]["target"] == "trainer"
    locks = {name: (REPO / "requirements" / f"{name}.lock").read_text() for name in ("serving", "trainer")}
    pins = {name: dict(re.findall(r"^([a-z0-9_.-]+)==(\S+) \\$", text, re.M)) for name, text in locks.items()}
    assert "tensorflow-cpu" not in pins["serving"] and "keras" not in pins["serving"]
    assert "tensorflow-cpu" in pins["trainer"]
    for text in locks.values():  # every pin with its hashes, installed with --require-hashes
        assert text.count("==") == len(re.findall(r"== *\S+ \\\n    --hash=sha256:", text)) > 10
    assert "--require-hashes" in dockerfile
    declared = re.findall(r'^  "([A-Za-z0-9_.-]+)', (REPO / "pyproject.toml").read_text().split("[project.optional")[0], re.M)
    for name in declared:  # every dependency pyproject.toml declares is locked, at one version in both images
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert key in pins["serving"] and pins["serving"][key] == pins["trainer"][key], name
    assert not {"boto3", "pytest", "colorama", "pip"} & set(pins["trainer"])


def test_readme_says_how_to_run_the_containers():
    readme = (REPO / "README.md").read_text()
    assert "docker compose up" in readme and COMPOSE.name in readme
