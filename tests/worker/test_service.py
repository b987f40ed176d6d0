from worker.service import _cause


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
