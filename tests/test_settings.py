import pytest

from streamadapt.settings import OPTIONS, SettingsError, load_settings


def test_defaults_env_and_override_precedence(monkeypatch):
    monkeypatch.setenv("STREAMADAPT_KAFKA_BOOTSTRAP", "broker:1")
    monkeypatch.setenv("STREAMADAPT_METRICS_PORT", "9500")
    settings = load_settings({"STREAMADAPT_METRICS_PORT": "9600"})
    assert settings.kafka.bootstrap == "broker:1"
    assert settings.metrics.port == 9600
    assert settings.kafka.input_topic == "purchases" and settings.redis.key_prefix == "streamadapt"


def test_unknown_variable_fails_loudly(monkeypatch):
    monkeypatch.setenv("STREAMADAPT_KAFKA_BOOSTRAP", "typo:1")
    with pytest.raises(SettingsError, match="unknown environment variable STREAMADAPT_KAFKA_BOOSTRAP"):
        load_settings()


@pytest.mark.parametrize("env, value, fragment", [
    ("STREAMADAPT_KAFKA_TOPIC_PARTITIONS", "many", "STREAMADAPT_KAFKA_TOPIC_PARTITIONS"),
    ("STREAMADAPT_METRICS_PORT", "70000", "STREAMADAPT_METRICS_PORT"),
    ("STREAMADAPT_ROLE", "boss", "STREAMADAPT_ROLE"),
    ("STREAMADAPT_MAX_PAYLOAD_BYTES", "1", "STREAMADAPT_MAX_PAYLOAD_BYTES"),
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


def test_password_is_masked_in_the_printed_config():
    settings = load_settings({"STREAMADAPT_REDIS_URL": "redis://:hunter2@cache:6379/0"})
    assert "hunter2" not in settings.describe()
    assert "STREAMADAPT_REDIS_URL=redis://:***@cache:6379/0" in settings.describe()


def test_every_option_has_a_unique_flag_env_and_description():
    assert len({o.env for o in OPTIONS}) == len({o.flag for o in OPTIONS}) == len(OPTIONS)
    assert all(o.env.startswith("STREAMADAPT_") and o.description for o in OPTIONS)
