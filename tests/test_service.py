import pytest

from streamadapt.core.features import FeatureSpec
from streamadapt.service import (
    RECORD_OVERHEAD_BYTES,
    _cause,
    _dead_letter_bound,
    user_state_ttl_warning,
)
from streamadapt.settings import RedisSettings, SettingsError, load_settings


def test_the_last_handshake_error_kafka_python_logged_is_the_cause_once_named():
    logged = [
        "Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: socket disconnected (backoff 0.05 secs)",
        "Bootstrap connection to bootstrap-0 failed: [Error 58] SaslAuthenticationFailedError: "
        "SaslAuthenticationFailedError: Authentication failed: Invalid username or password (backoff 0.16 secs)",
        "Bootstrap bootstrap-0 not ready; waiting 0.16 secs",
    ]
    assert _cause(logged) == " (SaslAuthenticationFailedError: Authentication failed: Invalid username or password)"


def test_no_cause_when_no_handshake_error_was_logged():
    assert _cause(["Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: socket disconnected"]) == ""


@pytest.mark.parametrize("ttl_days, memory_days, warned", [
    (90, 365.0, True), (365, 365.0, False), (400, 365.0, False), (90, None, False),
])
def test_the_operator_is_warned_when_user_states_expire_before_the_model_forgets_them(ttl_days, memory_days, warned):
    warning = user_state_ttl_warning(ttl_days * 86400, FeatureSpec(("books",), user_memory_days=memory_days))
    assert (warning is not None) == warned
    if warned:
        assert "is 90 days, shorter than the model's memory of an idle user (365 days)" in warning
        assert "raise it to 31536000 or more" in warning


def test_the_default_user_state_ttl_covers_the_default_memory():
    assert user_state_ttl_warning(RedisSettings().user_state_ttl_s, FeatureSpec(("books",))) is None


@pytest.mark.parametrize("topic_max_bytes, expected", [
    (None, 256 * 1024),  # the broker does not say: the setting
    (1_048_588, 256 * 1024),  # Kafka's default topic limit is above the setting
    (65_536, 65_536 - RECORD_OVERHEAD_BYTES),
])
def test_a_dead_letter_is_bounded_by_the_setting_and_by_what_its_topic_accepts(topic_max_bytes, expected):
    assert _dead_letter_bound(load_settings({}), topic_max_bytes) == expected


def test_a_dead_letter_topic_too_small_for_any_dead_letter_stops_start_up_with_one_line():
    with pytest.raises(SettingsError, match="accepts records of at most 2000 bytes"):
        _dead_letter_bound(load_settings({}), 2000)
