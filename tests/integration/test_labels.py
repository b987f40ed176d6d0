"""The worker's label join, checked against the label rules applied offline to the same event file."""
from collections import Counter

import pytest

from benchmarks.evaluation import stream_labels
from streamadapt.ops.generate import write_events
from streamadapt.ops.replay import replay
from streamadapt.settings import KafkaSettings
from streamadapt.state.store import StateStore
from streamadapt.training.pretrain import read_events
from tests.integration.conftest import WorkerProcess, produce, read_topic

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("keyed_by", ["user_id", "one key for all"])
def test_repurchase_labels_from_the_stream_match_the_offline_rules(stack, names, repurchase_checkpoint, tmp_path, keyed_by):
    path = tmp_path / "target.jsonl"
    write_events(path, events=10_000, market="target", drift_at=5_000, seed=21)
    events, _ = read_events(path)
    truth = stream_labels(events, "repurchase", horizon_days=7)
    with WorkerProcess(stack, names, repurchase_checkpoint, tmp_path / "worker.log",
                       STREAMADAPT_TRAINING_WINDOW_MAX_AGE_S=str(10**9)) as worker:
        if keyed_by == "user_id":
            # Six partitions read at different speeds: the watermark must follow the slowest one, and each
            # partition's deadlines are settled with its own records.
            replay(path, KafkaSettings(bootstrap=stack.kafka_bootstrap, input_topic=names.input_topic))
        else:  # not keyed by user: one partition holds, and settles, every user's deadlines
            produce(stack, names.input_topic, path.read_bytes().splitlines(), keys=[b"all"] * len(events))
        read_topic(stack, names.predictions_topic, expect=len(events), timeout_s=180)
        assert worker.stop() == 0
    client = stack.redis_client()
    store = StateStore(client, stack.redis_settings(names.key_prefix))
    labelled = {example.event_id: str(example.label) for example in store.recent_examples(10**9)}
    client.close()
    wrong = Counter((labelled[i], truth[i]) for i in labelled if labelled[i] != truth.get(i))
    assert not wrong, f"(worker, offline) label disagreements: {wrong}"
    assert set(labelled) <= set(truth)
    # Only negatives near the end of the stream may still wait for the watermark.
    missing = Counter(truth[i] for i in set(truth) - set(labelled))
    assert missing["1"] == 0 and missing["0"] <= 0.02 * len(truth), missing
