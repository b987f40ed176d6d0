"""The builder process, for real: a child process that builds batches against Redis, swaps weights between
batches, hands Redis errors back to the loop, and is reported when it dies."""
import json

import pytest
import redis

from tests.integration.conftest import dumps, event
from worker.builder import BuilderFailed, BuilderProcess
from worker.model import ServingModel
from worker.pipeline import InputRecord
from worker.settings import load_settings


def batch(first_offset: int, bodies: list[bytes]) -> list[InputRecord]:
    return [InputRecord("purchases", 0, first_offset + i, 1_000, b"user", body) for i, body in enumerate(bodies)]


@pytest.fixture
def model(checkpoint) -> ServingModel:
    return ServingModel.from_checkpoint(checkpoint)


def open_builder(stack, names, model, redis_url=None) -> BuilderProcess:
    settings = load_settings({**names.env(stack), **({"STREAMADAPT_REDIS_URL": redis_url} if redis_url else {})})
    return BuilderProcess(settings, model)


def test_a_batch_is_built_and_saved_in_the_child_and_a_swap_applies_from_the_next_batch(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder.submit(batch(0, [dumps(event(0, user="u1")), b"not json", dumps(event(1, user="u1"))]))
        first = builder.collect()
        assert (first.predicted, first.dead_letter_reasons, first.labels_resolved) == (2, ["invalid_json"], 1)
        assert {json.loads(value)["model_version"] for topic, _, value, _ in first.messages
                if topic == names.predictions_topic} == {model.version}
        assert redis.Redis.from_url(stack.redis_url).exists(f"{names.key_prefix}:profile:u1")

        builder.swap([w * 0.5 for w in model._weights], "v2")
        builder.submit(batch(3, [dumps(event(2, user="u1"))]), with_quality=True)
        second = builder.collect()
        assert [json.loads(value)["model_version"] for _, _, value, _ in second.messages] == ["v2"]
        assert second.quality is not None and model.version in second.quality
    finally:
        builder.close()


def test_a_redis_error_in_the_child_comes_back_as_the_same_error(stack, names, model):
    builder = open_builder(stack, names, model, redis_url="redis://127.0.0.1:1/0")
    try:
        builder.submit(batch(0, [dumps(event(0))]))
        with pytest.raises(redis.ConnectionError):
            builder.collect()
        assert not builder.in_flight
    finally:
        builder.close()


def test_a_dead_builder_is_reported_not_waited_for(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder._process.kill()
        builder._process.join()
        with pytest.raises(BuilderFailed, match="died"):
            builder.submit(batch(0, [dumps(event(0))]))
            builder.collect()
    finally:
        builder.close()


def test_a_bug_in_the_child_is_reported_with_the_records_it_was_building(stack, names, model):
    builder = open_builder(stack, names, model)
    try:
        builder.submit([InputRecord("purchases", 2, 40, 1_000, b"user", 12345)])  # a value no client would hand over
        with pytest.raises(BuilderFailed, match=r"(?s)batch of 1 records from purchases/2/40 to purchases/2/40:\n.*TypeError"):
            builder.collect()
    finally:
        builder.close()
