"""Redis goes away in mid-stream: the worker pauses, says it is not ready, keeps memory to one batch, and
resumes by itself when Redis is back; every event still gets its prediction.

The test runs its own redis-server (AOF, fsync on every write) so that it can kill and restart it."""
import signal
import subprocess
import time

import pytest
import redis

from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    dumps,
    event,
    free_port,
    needs_redis_server,
    produce,
    read_every_event_predicted,
    read_topic,
    start_redis,
    wait_for_redis,
)

pytestmark = pytest.mark.integration


def start_aof_redis(port: int, directory) -> subprocess.Popen:
    """Its own redis-server with AOF fsynced on every write, answering when this returns."""
    process = start_redis(directory, "--port", str(port), "--appendonly", "yes", "--appendfsync", "always")
    wait_for_redis(redis.Redis(port=port), process)
    return process


@needs_redis_server
@pytest.mark.parametrize("client, exactly_once", [
    ("kafka-python", False), ("confluent", False),
    pytest.param("kafka-python", True, marks=pytest.mark.faults), pytest.param("confluent", True, marks=pytest.mark.faults)])
def test_worker_pauses_while_redis_is_down_and_resumes_by_itself(stack, names, checkpoint, tmp_path, client, exactly_once):
    port = free_port()
    redis_process = start_aof_redis(port, tmp_path)
    bodies = [event(i, user=f"user-{i % 301}") for i in range(6000)]
    env = {"STREAMADAPT_REDIS_URL": f"redis://127.0.0.1:{port}/0", "STREAMADAPT_KAFKA_MAX_POLL_RECORDS": "200",
           "STREAMADAPT_ROLE": "worker", "STREAMADAPT_KAFKA_CLIENT": client,
           "STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower()}
    try:
        with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env) as worker:
            produce(stack, names.input_topic, [dumps(b) for b in bodies[:3000]], keys=[b["user_id"].encode() for b in bodies[:3000]])
            worker.wait_metric("streamadapt_predictions_total", 3000, timeout_s=120)
            redis_process.send_signal(signal.SIGKILL)
            redis_process.wait(timeout=10)
            produce(stack, names.input_topic, [dumps(b) for b in bodies[3000:]], keys=[b["user_id"].encode() for b in bodies[3000:]])
            worker.wait_metric("streamadapt_consumption_paused", 1, timeout_s=60)
            worker.wait_until(lambda: worker.http_status("/readyz") == 503, timeout_s=30, what="/readyz saying 503")
            paused_at = worker.metric("streamadapt_events_consumed_total")
            time.sleep(3)  # while paused, nothing more is taken from Kafka (the batch in hand is retried)
            assert worker.metric("streamadapt_events_consumed_total") - paused_at <= 3 * 200
            assert worker.process.poll() is None, "the worker exited during the outage"
            redis_process = start_aof_redis(port, tmp_path)  # the same AOF: claims and user state come back
            records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=180, settle_s=2,
                                 committed_only=exactly_once)
            worker.wait_until(lambda: worker.http_status("/readyz") == 200, timeout_s=30, what="ready again")
            assert worker.metric("streamadapt_consumption_paused") == 0
            assert worker.metric("streamadapt_dependency_errors_total") >= 1
            assert worker.stop() == 0
    finally:
        redis_process.kill()
    assert check_every_event_predicted(bodies, records) == 0  # the retried batch was re-emitted only if it was sent


@needs_redis_server
def test_worker_pauses_while_redis_is_full_and_resumes_once_memory_is_raised(stack, names, checkpoint, tmp_path):
    port = free_port()
    redis_process = start_redis(tmp_path, "--port", str(port), "--maxmemory-policy", "noeviction")
    client = redis.Redis(port=port)
    wait_for_redis(client, redis_process)
    # room for about a thousand events' claims, profiles and examples, well short of the 4,000 sent
    client.config_set("maxmemory", client.info("memory")["used_memory"] + (1 << 20))
    bodies = [event(i, user=f"user-{i % 301}") for i in range(4000)]
    env = {"STREAMADAPT_REDIS_URL": f"redis://127.0.0.1:{port}/0", "STREAMADAPT_KAFKA_MAX_POLL_RECORDS": "200",
           "STREAMADAPT_ROLE": "worker"}
    try:
        with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env) as worker:
            produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
            worker.wait_metric("streamadapt_consumption_paused", 1, timeout_s=60)
            worker.wait_until(lambda: worker.http_status("/readyz") == 503, timeout_s=30, what="/readyz saying 503")
            assert 0 < worker.metric("streamadapt_predictions_total") < len(bodies)
            time.sleep(2)
            assert worker.process.poll() is None, "the worker exited when Redis was full"
            # a retried batch may squeeze in when Redis's memory dips (a refused request's buffer is freed),
            # but what Redis does not hold is not sent
            assert worker.metric("streamadapt_predictions_total") < len(bodies)
            client.config_set("maxmemory", 0)
            records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=120, settle_s=2)
            worker.wait_until(lambda: worker.http_status("/readyz") == 200, timeout_s=30, what="ready again")
            assert worker.metric("streamadapt_dependency_errors_total") >= 1
            assert worker.stop() == 0
    finally:
        redis_process.kill()
    assert "OutOfMemoryError" in (tmp_path / "worker.log").read_text()
    assert check_every_event_predicted(bodies, records) == 0


@needs_redis_server
def test_trainer_waits_out_a_redis_outage_and_leads_again(stack, names, checkpoint, tmp_path):
    port = free_port()
    redis_process = start_aof_redis(port, tmp_path)
    env = {"STREAMADAPT_REDIS_URL": f"redis://127.0.0.1:{port}/0", "STREAMADAPT_NO_FINETUNE": "false",
           "STREAMADAPT_ROLE": "trainer"}  # the default lease: renewed every 5 s, so the loop meets the outage first
    try:
        with WorkerProcess(stack, names, checkpoint, tmp_path / "trainer.log", **env) as trainer:
            trainer.wait_metric("streamadapt_trainer_leader", 1, timeout_s=30)
            redis_process.send_signal(signal.SIGKILL)
            redis_process.wait(timeout=10)
            trainer.wait_until(lambda: trainer.metric("streamadapt_trainer_leader") == 0, 30, "the lease given up")
            time.sleep(3)  # many ticks of the trainer's loop, each of which reads Redis
            assert trainer.process.poll() is None, "the trainer exited during the outage"
            redis_process = start_aof_redis(port, tmp_path)
            trainer.wait_metric("streamadapt_trainer_leader", 1, timeout_s=30)
            assert trainer.stop() == 0
    finally:
        redis_process.kill()


@needs_redis_server
@pytest.mark.parametrize("client, exactly_once", [
    ("kafka-python", True), pytest.param("confluent", True, marks=pytest.mark.faults),
    pytest.param("kafka-python", False, marks=pytest.mark.faults), pytest.param("confluent", False, marks=pytest.mark.faults)])
def test_partitions_a_member_joining_during_a_redis_outage_takes_are_left_to_it(stack, names, checkpoint, tmp_path,
                                                                                 client, exactly_once):
    """Two members pause in a Redis outage; a third joins meanwhile, on a Redis of its own that is up, and takes
    partitions from both. The rebalance takes the two members' batches in hand: the third reads its partitions
    from their committed offsets, and the two read theirs again from the first record they held. Had they
    written or sent the third's records, the same records would have two predictions made from two different
    Redis states, which the check catches; had they sent their batch in hand and read it again, exactly-once
    would show duplicates; had they dropped it and read on, events would be missing."""
    port = free_port()
    redis_process = start_aof_redis(port, tmp_path)
    bodies = [event(i, user=f"user-{i % 301}") for i in range(6000)]
    keys = [b["user_id"].encode() for b in bodies]
    env = {"STREAMADAPT_REDIS_URL": f"redis://127.0.0.1:{port}/0", "STREAMADAPT_KAFKA_MAX_POLL_RECORDS": "200",
           "STREAMADAPT_ROLE": "worker", "STREAMADAPT_KAFKA_SESSION_TIMEOUT_MS": "6000",
           "STREAMADAPT_KAFKA_CLIENT": client, "STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower()}

    def member(slot: int, **more: str) -> WorkerProcess:
        return WorkerProcess(stack, names, checkpoint, tmp_path / f"member{slot}.log",
                             STREAMADAPT_KAFKA_TRANSACTIONAL_ID=f"{names.group_id}-{slot}", **{**env, **more})

    members = [member(0).start(), member(1).start()]
    try:
        produce(stack, names.input_topic, [dumps(b) for b in bodies[:3000]], keys=keys[:3000])
        members[0].wait_until(lambda: sum(m.metric("streamadapt_predictions_total") for m in members) >= 3000, 120,
                              "the first half predicted")
        redis_process.send_signal(signal.SIGKILL)
        redis_process.wait(timeout=10)
        produce(stack, names.input_topic, [dumps(b) for b in bodies[3000:]], keys=keys[3000:])
        for paused in members:
            paused.wait_metric("streamadapt_consumption_paused", 1, timeout_s=60)
        third = member(2, STREAMADAPT_REDIS_URL=stack.redis_url).start()  # a prefix of the test's own there too
        members.append(third)
        third.wait_until(lambda: third.metric("streamadapt_predictions_total") > 0, 120, "the third member serving")
        redis_process = start_aof_redis(port, tmp_path)
        for resumed in members[:2]:
            resumed.wait_until(lambda m=resumed: m.metric("streamadapt_consumption_paused") == 0, 60, "resumed")
        left = sum("a rebalance took the batch in hand" in m.log_path.read_text() for m in members[:2])
        assert third.stop() == 0  # its partitions go back to the two, from the offsets it committed
        records = read_every_event_predicted(stack, names.predictions_topic, {b["event_id"] for b in bodies}, 180,
                                             committed_only=exactly_once)
        for serving in members[:2]:
            assert serving.stop() == 0
    finally:
        for process in members:
            process.__exit__(None, None, None)
        redis_process.kill()
    duplicates = check_every_event_predicted(bodies, records)
    print(f"the rebalance took the batch in hand of {left} of the two paused members; {duplicates} re-emitted")
    assert left >= 1, "the rebalance took no batch in hand: the test proved nothing"
    if exactly_once:
        assert duplicates == 0
