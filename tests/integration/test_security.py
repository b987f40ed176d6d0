"""Security settings against the real servers: Kafka SASL/PLAIN on the dev stack's SASL listener, a Redis
server that wants a password, and a Redis server that speaks only TLS, with a CA made by the test.

A worker with the right credentials serves; one with wrong credentials stops at start-up with one readable
line, no traceback, and never prints the secret."""
import shutil
import subprocess
import time

import pytest
import redis

from streamadapt.state.keys import KeyLayout
from tests.conftest import STACK_DIR, new_names
from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    dumps,
    event,
    free_port,
    needs_redis_server,
    produce,
    read_topic,
    run_expecting_failure,
    start_redis,
    wait_for_redis,
)

pytestmark = pytest.mark.integration

DEV_SASL_USER, DEV_SASL_PASSWORD = "streamadapt", "streamadapt-dev-secret"  # scripts/dev-stack's SASL listener
REDIS_PASSWORD = "redis-test-secret-4f1c"
ACL_PASSWORD = "acl-test-secret-9b2e"


def sasl_bootstrap(bootstrap: str, port_offset: int = 2) -> str:
    """The dev stack's other listeners: SASL_PLAINTEXT at the broker's port + 2, SSL + 3, SASL_SSL + 4."""
    host, port = bootstrap.rsplit(":", 1)
    return f"{host}:{int(port) + port_offset}"


KAFKA_TLS = STACK_DIR / "kafka" / "tls"
KAFKA_CA = KAFKA_TLS / "ca.pem"  # the dev stack's CA, which signed its broker's certificate and a client's


def serve_a_few(stack, names, checkpoint, log_path, **env) -> None:
    bodies = [event(i) for i in range(200)]
    with WorkerProcess(stack, names, checkpoint, log_path, STREAMADAPT_ROLE="worker", **env) as worker:
        produce(stack, names.input_topic, [dumps(b) for b in bodies])
        records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=60)
        assert worker.stop() == 0
    check_every_event_predicted(bodies, records)


@pytest.mark.faults  # SASL PLAIN serves in the suite through SASL_SSL, and SASL_PLAINTEXT through SCRAM; the refusal waits ~30 s
def test_worker_serves_through_kafka_sasl_and_refuses_a_wrong_password(stack, names, checkpoint, tmp_path):
    sasl = {"STREAMADAPT_KAFKA_BOOTSTRAP": sasl_bootstrap(stack.kafka_bootstrap),
            "STREAMADAPT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "STREAMADAPT_KAFKA_SASL_MECHANISM": "PLAIN",
            "STREAMADAPT_KAFKA_SASL_USERNAME": DEV_SASL_USER, "STREAMADAPT_KAFKA_SASL_PASSWORD": DEV_SASL_PASSWORD}
    serve_a_few(stack, names, checkpoint, tmp_path / "sasl.log", **sasl)  # the test's own clients use PLAINTEXT
    log = (tmp_path / "sasl.log").read_text()
    assert "STREAMADAPT_KAFKA_SASL_PASSWORD=***" in log and DEV_SASL_PASSWORD not in log

    wrong = WorkerProcess(stack, names, checkpoint, tmp_path / "unused.log", **sasl).env
    wrong["STREAMADAPT_KAFKA_SASL_PASSWORD"] = "not-the-password"
    stderr = run_expecting_failure(wrong)
    error_line = next(line for line in stderr.splitlines() if line.startswith("streamadapt run: error:"))
    assert "cannot reach Kafka" in error_line and "Authentication failed" in error_line, error_line
    assert "not-the-password" not in stderr


@needs_redis_server
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", pytest.param("SCRAM-SHA-512", marks=pytest.mark.faults)])
def test_worker_serves_through_kafka_scram_on_both_clients(stack, names, checkpoint, tmp_path, mechanism):
    from kafka import KafkaAdminClient
    from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

    user, password = f"scram-{names.key_prefix}", "scram-test-secret-7d1a"
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    admin.alter_user_scram_credentials([UserScramCredentialUpsertion(user, ScramMechanism[mechanism.replace("-", "_")],
                                                                      password)])
    admin.close()
    time.sleep(1)  # the credential reaches the SASL listener through the metadata log
    for client in ("confluent", "kafka-python"):
        serve_a_few(stack, new_names(), checkpoint, tmp_path / f"{client}.log",
                    STREAMADAPT_KAFKA_BOOTSTRAP=sasl_bootstrap(stack.kafka_bootstrap), STREAMADAPT_KAFKA_CLIENT=client,
                    STREAMADAPT_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", STREAMADAPT_KAFKA_SASL_MECHANISM=mechanism,
                    STREAMADAPT_KAFKA_SASL_USERNAME=user, STREAMADAPT_KAFKA_SASL_PASSWORD=password)
        assert password not in (tmp_path / f"{client}.log").read_text()


def test_worker_uses_a_redis_password_and_refuses_a_wrong_one(stack, names, checkpoint, tmp_path):
    port = free_port()
    process = start_redis(tmp_path, "--port", str(port), "--requirepass", REDIS_PASSWORD)
    try:
        wait_for_redis(redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD), process)
        serve_a_few(stack, names, checkpoint, tmp_path / "auth.log",
                    STREAMADAPT_REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0")
        log = (tmp_path / "auth.log").read_text()
        assert f"STREAMADAPT_REDIS_URL=redis://:***@127.0.0.1:{port}/0" in log and REDIS_PASSWORD not in log
        assert redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD).dbsize() > 0, "the worker wrote nothing to this Redis"

        env = WorkerProcess(stack, names, checkpoint, tmp_path / "unused.log").env
        for url in (f"redis://:wrong-password@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
            stderr = run_expecting_failure({**env, "STREAMADAPT_REDIS_URL": url})
            assert "cannot reach Redis" in stderr and "wrong-password" not in stderr, stderr[-2000:]

        # an ACL user of its own, its password given as ?password= (masked too)
        admin = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD)
        admin.acl_setuser("streamadapt-app", enabled=True, passwords=[f"+{ACL_PASSWORD}"], keys=["*"], channels=["*"],
                          commands=["+@all"])
        acl_names = new_names()
        serve_a_few(stack, acl_names, checkpoint, tmp_path / "acl.log",
                    STREAMADAPT_REDIS_URL=f"redis://streamadapt-app@127.0.0.1:{port}/0?password={ACL_PASSWORD}")
        log = (tmp_path / "acl.log").read_text()
        assert "?password=***" in log and ACL_PASSWORD not in log
        assert admin.exists(KeyLayout(acl_names.key_prefix).meta("event_time")), "the ACL user's writes landed"
    finally:
        process.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
@pytest.mark.parametrize("protocol, client, refusal", [
    ("SSL", "kafka-python", False), ("SASL_SSL", "confluent", False),
    pytest.param("SSL", "kafka-python", True, marks=pytest.mark.faults),
    pytest.param("SSL", "confluent", True, marks=pytest.mark.faults),
    pytest.param("SASL_SSL", "kafka-python", True, marks=pytest.mark.faults)])
def test_worker_serves_through_kafka_tls_and_refuses_a_broker_its_ca_did_not_sign(stack, names, checkpoint, tmp_path,
                                                                                 protocol, client, refusal):
    """The SSL listener requires a client certificate (mutual TLS), which the worker presents. `refusal`: also
    start a worker with a CA that did not sign the broker's certificate and, on SSL, one without a client
    certificate; each stops with one line once the client gives up its bootstrap (about 30 s: with -m faults,
    as the SASL password's refusal)."""
    tls = {"STREAMADAPT_KAFKA_BOOTSTRAP": sasl_bootstrap(stack.kafka_bootstrap, 3 if protocol == "SSL" else 4),
           "STREAMADAPT_KAFKA_SECURITY_PROTOCOL": protocol, "STREAMADAPT_KAFKA_SSL_CAFILE": str(KAFKA_CA),
           "STREAMADAPT_KAFKA_CLIENT": client}
    if protocol == "SSL":
        tls.update({"STREAMADAPT_KAFKA_SSL_CERTFILE": str(KAFKA_TLS / "client.crt"),
                    "STREAMADAPT_KAFKA_SSL_KEYFILE": str(KAFKA_TLS / "client.key")})
    if protocol == "SASL_SSL":
        tls.update({"STREAMADAPT_KAFKA_SASL_MECHANISM": "PLAIN", "STREAMADAPT_KAFKA_SASL_USERNAME": DEV_SASL_USER,
                    "STREAMADAPT_KAFKA_SASL_PASSWORD": DEV_SASL_PASSWORD})
    serve_a_few(stack, names, checkpoint, tmp_path / "tls.log", **tls)  # the test's own clients use PLAINTEXT
    if not refusal:
        return
    stranger = make_tls_files(tmp_path)["ca"]  # a CA that never signed the broker's certificate
    env = WorkerProcess(stack, new_names(), checkpoint, tmp_path / "unused.log", **tls).env
    refused = [{**env, "STREAMADAPT_KAFKA_SSL_CAFILE": stranger}]
    if protocol == "SSL":
        refused.append({name: value for name, value in env.items()
                        if name not in ("STREAMADAPT_KAFKA_SSL_CERTFILE", "STREAMADAPT_KAFKA_SSL_KEYFILE")})
    for refused_env in refused:
        output = run_expecting_failure(refused_env)
        error_line = next(line for line in output.splitlines() if line.startswith("streamadapt run: error:"))
        assert "cannot reach Kafka" in error_line, error_line


def make_tls_files(directory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it (openssl, 1 day)."""
    files = {name: str(directory / f"{name}.pem") for name in ("ca", "ca-key", "server", "server-key", "client",
                                                                 "client-key")}
    openssl = shutil.which("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=streamadapt-test-ca",
                    "-keyout", files["ca-key"], "-out", files["ca"]], check=True, capture_output=True)
    csr = str(directory / "server.csr")
    subprocess.run([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-keyout", files["server-key"], "-out", csr], check=True, capture_output=True)
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run([openssl, "x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", files["ca-key"], "-CAcreateserial",
                    "-days", "1", "-extfile", str(extensions), "-out", files["server"]], check=True, capture_output=True)
    client_csr = str(directory / "client.csr")
    subprocess.run([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=streamadapt-worker",
                    "-keyout", files["client-key"], "-out", client_csr], check=True, capture_output=True)
    subprocess.run([openssl, "x509", "-req", "-in", client_csr, "-CA", files["ca"], "-CAkey", files["ca-key"],
                    "-CAcreateserial", "-days", "1", "-out", files["client"]], check=True, capture_output=True)
    return files


def start_tls_redis(directory, client_certificates: bool) -> tuple[dict[str, str], int, subprocess.Popen]:
    """A redis-server that speaks only TLS, with the certificates of make_tls_files, answering when this returns;
    with `client_certificates` it requires one of its clients."""
    tls, port = make_tls_files(directory), free_port()
    process = start_redis(directory, "--port", "0", "--tls-port", str(port), "--tls-cert-file", tls["server"],
                          "--tls-key-file", tls["server-key"], "--tls-ca-cert-file", tls["ca"],
                          "--tls-auth-clients", "yes" if client_certificates else "no")
    client = {"ssl_certfile": tls["client"], "ssl_keyfile": tls["client-key"]} if client_certificates else {}
    wait_for_redis(redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=tls["ca"], **client), process)
    return tls, port, process


@needs_redis_server
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
def test_worker_talks_tls_to_redis_with_its_ca_and_refuses_an_unknown_server(stack, names, checkpoint, tmp_path):
    tls, port, process = start_tls_redis(tmp_path, client_certificates=False)
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        serve_a_few(stack, names, checkpoint, tmp_path / "tls.log", STREAMADAPT_REDIS_URL=url,
                    STREAMADAPT_REDIS_TLS_CA_FILE=tls["ca"])

        env = {**WorkerProcess(stack, names, checkpoint, tmp_path / "unused.log").env, "STREAMADAPT_REDIS_URL": url}
        stderr = run_expecting_failure(env)  # the system's CAs do not know the test's CA
        assert "cannot reach Redis" in stderr and "certificate verify failed" in stderr, stderr[-2000:]
        plain = {**env, "STREAMADAPT_REDIS_URL": f"redis://127.0.0.1:{port}/0"}  # TLS server, plain client
        assert "cannot reach Redis" in run_expecting_failure(plain)
    finally:
        process.kill()


@needs_redis_server
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
def test_worker_presents_its_client_certificate_to_a_redis_that_requires_one(stack, names, checkpoint, tmp_path):
    tls, port, process = start_tls_redis(tmp_path, client_certificates=True)
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        serve_a_few(stack, names, checkpoint, tmp_path / "mtls.log", STREAMADAPT_REDIS_URL=url,
                    STREAMADAPT_REDIS_TLS_CA_FILE=tls["ca"], STREAMADAPT_REDIS_TLS_CERTFILE=tls["client"],
                    STREAMADAPT_REDIS_TLS_KEYFILE=tls["client-key"])
        env = {**WorkerProcess(stack, names, checkpoint, tmp_path / "unused.log").env, "STREAMADAPT_REDIS_URL": url,
               "STREAMADAPT_REDIS_TLS_CA_FILE": tls["ca"]}
        assert "cannot reach Redis" in run_expecting_failure(env)  # no client certificate: refused
    finally:
        process.kill()
