"""BatchBuilder against the real Redis of the dev stack."""
import json
from datetime import datetime, timedelta, timezone

import redis

from streamadapt.kafka.protocol import InputRecord
from streamadapt.model.checkpoint import ServingModel, features_for
from streamadapt.serving import batch as batch_module
from streamadapt.serving.batch import BatchBuilder
from streamadapt.settings import load_settings
from streamadapt.state.store import StateStore, WindowPolicy


def test_example_windows_expire_without_a_trainer_as_event_time_passes(each_redis, names, checkpoint, monkeypatch):
    """--no-finetune runs no trainer: the serving path itself drops windows past their maximum age, so a long
    replay keeps Redis bounded."""
    monkeypatch.setattr(batch_module, "WINDOWS_EXPIRY_INTERVAL_S", 0.0)
    settings = load_settings({**names.env(each_redis), "STREAMADAPT_TRAINING_WINDOW_MAX_AGE_S": str(5 * 86400)})
    model = ServingModel.from_checkpoint(checkpoint)
    features = features_for(model.meta, settings.features)
    client = each_redis.redis_client()
    store = StateStore(client, settings.redis, WindowPolicy.of(settings.training), features)
    builder = BatchBuilder(settings, store, model, features)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    offset = 0
    for day in range(60):  # two months of event time, a purchase per user and day
        records = []
        for user in range(20):
            ts = start + timedelta(days=day, minutes=user)
            body = {"event_id": f"e{day}-{user}", "user_id": f"u{user}", "item_id": "i", "category": "books",
                    "price": 5.0, "quantity": 1, "ts": ts.isoformat()}
            records.append(InputRecord(names.input_topic, 0, offset, 0, b"u", json.dumps(body).encode()))
            offset += 1
        built, writes = builder.build(records)
        builder.save(built, writes)
    windows = store.window_sizes()
    assert sum(windows.values()) > 0
    # labels of the last day are known up to the watermark (an hour of lateness behind it): the windows left
    # are the last five days' and the one in progress, give or take the edge
    assert len(windows) <= 5 + 2, sorted(windows)
    client.close()


def test_one_stale_event_in_the_first_batch_does_not_date_the_streams_history(stack, names, checkpoint):
    settings = load_settings(names.env(stack))
    model = ServingModel.from_checkpoint(checkpoint)
    features = features_for(model.meta, settings.features)
    client = redis.Redis.from_url(stack.redis_url)
    store = StateStore(client, settings.redis, WindowPolicy.of(settings.training), features)
    builder = BatchBuilder(settings, store, model, features)
    start = datetime(2025, 6, 1, tzinfo=timezone.utc)
    times = [start - timedelta(days=700)] + [start + timedelta(minutes=i) for i in range(20)]  # within the skew
    records = [InputRecord(names.input_topic, 0, i, 0, b"u", json.dumps({
        "event_id": f"e{i}", "user_id": f"u{i}", "item_id": "i", "category": "books", "price": 5.0, "quantity": 1,
        "ts": ts.isoformat()}).encode()) for i, ts in enumerate(times)]
    built, writes = builder.build(records)
    builder.save(built, writes)
    observed_since = float(client.get(store.keys.meta("observed_since")))
    assert observed_since == start.timestamp()  # the oldest of the others, not the stale event
    client.close()
