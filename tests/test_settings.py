import logging

import pytest

from streamadapt.settings import OPTIONS, SettingsError, load_settings


def test_defaults_env_and_override_precedence(monkeypatch):
    monkeypatch.setenv("STREAMADAPT_KAFKA_BOOTSTRAP", "broker:1")
    monkeypatch.setenv("STREAMADAPT_METRICS_PORT", "9500")
    settings = load_settings({"STREAMADAPT_METRICS_PORT": "9600"})
    assert settings.kafka.bootstrap == "broker:1"
    assert settings.metrics.port == 9600
    assert settings.kafka.input_topic == "purchases" and settings.redis.key_prefix == "streamadapt"


def test_an_unknown_variable_is_a_warning_naming_the_setting_it_is_closest_to(monkeypatch, caplog):
    monkeypatch.setenv("STREAMADAPT_KAFKA_BOOSTRAP", "typo:1")
    monkeypatch.setenv("STREAMADAPT_PORT", "tcp://10.0.0.7:9400")  # what Kubernetes sets for a Service "streamadapt"
    with caplog.at_level(logging.WARNING, logger="streamadapt.settings"):
        settings = load_settings()
    assert settings.kafka.bootstrap != "typo:1"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "STREAMADAPT_KAFKA_BOOSTRAP" in warnings[0] and "did you mean STREAMADAPT_KAFKA_BOOTSTRAP?" in warnings[0]
    assert "STREAMADAPT_PORT" in warnings[1] and "did you mean" not in warnings[1]


@pytest.mark.parametrize("env, value, fragment", [
    ("STREAMADAPT_KAFKA_TOPIC_PARTITIONS", "many", "STREAMADAPT_KAFKA_TOPIC_PARTITIONS"),
    ("STREAMADAPT_METRICS_PORT", "70000", "STREAMADAPT_METRICS_PORT"),
    ("STREAMADAPT_ROLE", "boss", "STREAMADAPT_ROLE"),
    ("STREAMADAPT_MAX_PAYLOAD_BYTES", "1", "STREAMADAPT_MAX_PAYLOAD_BYTES"),
    ("STREAMADAPT_REDIS_KEY_PREFIX", "shop{1}", "hash tag"),
    ("STREAMADAPT_REDIS_CLUSTER_SHARDS", "0", "STREAMADAPT_REDIS_CLUSTER_SHARDS"),
])
def test_bad_value_is_one_readable_line(monkeypatch, env, value, fragment):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_settings_are_frozen():
    settings = load_settings()
    with pytest.raises(Exception):
        settings.kafka.bootstrap = "elsewhere:1"


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://app:hunter2@cache:6379/0", "redis://app:***@cache:6379/0"),
    ("redis://cache:6379/0?password=hunter2&socket_timeout=5", "redis://cache:6379/0?password=***&socket_timeout=5"),
    ("rediss://cache:6379/0?Password=hunter2", "rediss://cache:6379/0?Password=***"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
])
def test_password_is_masked_in_the_printed_config(url, shown):
    settings = load_settings({"STREAMADAPT_REDIS_URL": url})
    assert "hunter2" not in settings.describe()
    assert f"STREAMADAPT_REDIS_URL={shown}" in settings.describe()


def test_secrets_are_secret_strings_shown_nowhere_but_where_they_are_used(monkeypatch):
    monkeypatch.setenv("STREAMADAPT_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMADAPT_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMADAPT_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("STREAMADAPT_REDIS_URL", "redis://:sesame@cache:6379/0")
    settings = load_settings()
    for shown in (repr(settings), str(settings), settings.describe()):
        assert "hunter2" not in shown and "sesame" not in shown
    assert "STREAMADAPT_KAFKA_SASL_PASSWORD=***" in settings.describe()
    child = settings.as_environment()  # what a child process is started with: in clear
    assert child["STREAMADAPT_KAFKA_SASL_PASSWORD"] == "hunter2"
    assert child["STREAMADAPT_REDIS_URL"] == "redis://:sesame@cache:6379/0"


def test_a_bad_secret_is_not_repeated_in_the_error(monkeypatch):
    monkeypatch.setenv("STREAMADAPT_REDIS_URL", "http://:sesame@cache")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "sesame" not in str(error.value) and "STREAMADAPT_REDIS_URL" in str(error.value)


def test_every_option_has_a_unique_flag_env_and_description():
    assert len({o.env for o in OPTIONS}) == len({o.flag for o in OPTIONS}) == len(OPTIONS)
    assert all(o.env.startswith("STREAMADAPT_") and o.description for o in OPTIONS)
