"""The command line as an operator meets it: bad input ends in one readable line."""
import os
import subprocess
import sys

import pytest


def streamadapt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamadapt.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("args, fragment", [
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["run"], "--source-checkpoint"),
    (["run", "--role", "boss", "--source-checkpoint", "x"], "STREAMADAPT_ROLE"),
    (["run", "--metrics-port", "notaport", "--source-checkpoint", "x"], "STREAMADAPT_METRICS_PORT"),
    (["run", "--source-checkpoint", "/nonexistent/ckpt", "--metrics-port", "0"], "is not a checkpoint"),
    (["generate", "--out", "/tmp/x.jsonl", "--events", "0"], "events must be >= 1"),
    (["pretrain", "--events", "/tmp/x.jsonl", "--out", "/tmp/x", "--user-memory-days", "0"], "must be positive"),
])
def test_bad_flags_and_values_stop_with_one_line(args, fragment):
    result = streamadapt(*args)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr


def test_a_file_that_labels_too_few_purchases_is_refused_by_pretrain_with_one_line(tmp_path):
    events = tmp_path / "once-each.jsonl"  # 150 customers who buy once: no purchase has a next one
    events.write_text("".join(f'{{"event_id":"e{i}","user_id":"u{i}","item_id":"i","price":5,"quantity":1,'
                              f'"ts":"2025-01-{1 + i % 28:02d}T00:00:00Z"}}\n' for i in range(150)))
    result = streamadapt("pretrain", "--events", str(events), "--out", str(tmp_path / "ckpt"), "--task", "next_category")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "settles the next_category label of 0 purchases" in result.stderr and "needs at least 100" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def daily_buyers(path, days: int, users: int = 80):
    """`users` customers who each buy every day for `days` days."""
    path.write_text("".join(f'{{"event_id":"e{d}-{u}","user_id":"u{u}","item_id":"i","price":5,"quantity":1,'
                            f'"ts":"2025-01-01T{u % 24:02d}:00:00Z"}}\n'.replace("2025-01-01", f"2025-{1 + d // 28:02d}-{1 + d % 28:02d}")
                            for d in range(days) for u in range(users)))
    return path


@pytest.mark.parametrize("days, horizon, fragment", [
    (20, 30, "settles the repurchase label of 0 purchases (those more than 30 days before its last event"),
    (40, 7, "every example of its validation part (the newest tenth of the settled examples) has one label"),
])
def test_pretrain_refuses_a_file_whose_settled_labels_cannot_measure_a_model(tmp_path, days, horizon, fragment):
    events = daily_buyers(tmp_path / "daily.jsonl", days)  # everybody comes back the next day: every label is 1
    result = streamadapt("pretrain", "--events", str(events), "--out", str(tmp_path / "ckpt"), "--task", "repurchase",
                         "--horizon-days", str(horizon))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unreachable_broker_is_one_line(tmp_path):
    import os

    events = tmp_path / "e.jsonl"
    events.write_text('{"event_id": "e"}\n')
    env = {**os.environ, "STREAMADAPT_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    result = subprocess.run([sys.executable, "-m", "streamadapt.cli", "replay", "--events", str(events)], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: Kafka:" in result.stderr and "STREAMADAPT_KAFKA_BOOTSTRAP" in result.stderr


def test_an_unknown_environment_variable_does_not_stop_start_up():
    import os

    env = {**os.environ, "STREAMADAPT_KAFKA_BOOSTRAP": "x", "STREAMADAPT_PORT": "tcp://10.0.0.7:9400"}
    result = streamadapt("run", env=env)  # still stops: no --source-checkpoint, after the warnings
    assert result.returncode == 2 and "--source-checkpoint" in result.stderr
    assert "did you mean STREAMADAPT_KAFKA_BOOTSTRAP?" in result.stderr and "STREAMADAPT_PORT" in result.stderr


def test_run_help_lists_every_variable_and_the_baseline():
    from streamadapt.settings import OPTIONS

    result = streamadapt("run", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "--no-finetune serves the source model unchanged" in text
    for option in OPTIONS:
        assert option.env in text, option.env


def test_generate_is_deterministic_by_seed(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        assert streamadapt("generate", "--out", str(path), "--events", "300", "--seed", "9").returncode == 0
    assert a.read_bytes() == b.read_bytes() and len(a.read_text().splitlines()) == 300


def test_tls_and_sasl_settings_are_checked_before_anything_connects(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMADAPT_")}
    cases = [
        ({"STREAMADAPT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs STREAMADAPT_KAFKA_SASL_USERNAME"),
        ({"STREAMADAPT_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAMADAPT_KAFKA_SSL_CAFILE": str(tmp_path / "none.pem")},
         "is not a readable file"),
        ({"STREAMADAPT_KAFKA_SASL_PASSWORD": "s3cret-value"}, "does not use SASL"),
        ({"STREAMADAPT_REDIS_TLS_CA_FILE": "/etc/hostname"}, "is not a rediss:// (TLS) URL"),
        ({"STREAMADAPT_REDIS_URL": "rediss://127.0.0.1:1/0", "STREAMADAPT_REDIS_TLS_CERTFILE": "/etc/hostname"},
         "go together"),
        ({"STREAMADAPT_REDIS_URL": "http://127.0.0.1:1/0"}, "must start with redis://"),
    ]
    for extra, fragment in cases:
        result = subprocess.run([sys.executable, "-m", "streamadapt.cli", "run", "--source-checkpoint", str(tmp_path)],
                                env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (extra, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (extra, result.stderr)
        assert "s3cret-value" not in result.stderr


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    result = streamadapt("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"streamadapt {version('streamadapt')}"


@pytest.mark.parametrize("argv, no_finetune", [
    ([], None), (["--no-finetune"], True), (["--no-finetune", "--finetune"], False), (["--finetune"], False),
])
def test_a_negative_switch_can_be_switched_back(argv, no_finetune):
    from streamadapt.cli import build_parser

    assert build_parser().parse_args(["run", *argv]).STREAMADAPT_NO_FINETUNE is no_finetune


def test_with_a_json_log_every_line_is_one_json_object_the_settings_and_the_error_too(tmp_path):
    import json

    result = streamadapt("run", "--log-format", "json", "--source-checkpoint", str(tmp_path / "none"),
                         "--metrics-port", "0")
    lines = result.stderr.splitlines()
    entries = [json.loads(line) for line in lines]  # raises on any line that is not one JSON object
    assert result.returncode != 0
    assert entries[0]["message"].startswith("starting role all with STREAMADAPT_ROLE=all ")  # the settings: one line
    assert entries[-1]["level"] == "ERROR" and "is not a checkpoint" in entries[-1]["message"]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
