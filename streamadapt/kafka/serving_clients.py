"""The serving loop's consumer and producer, on the client library the settings name."""
from __future__ import annotations

from streamadapt.kafka import confluent, kafka_python
from streamadapt.kafka.protocol import ServingConsumer, ServingProducer
from streamadapt.settings import KafkaSettings


def open_serving_clients(settings: KafkaSettings, transactional_id: str | None, max_batch_bytes: int | None = None
                         ) -> tuple[ServingConsumer, ServingProducer]:
    """(consumer, producer) on `settings.client`; a transactional producer when `transactional_id` is given.
    The producer's batches of records to one partition take at most `max_batch_bytes` (the smallest
    max.message.bytes of the output topics, less overhead), or the client's own bound when it is smaller."""
    adapter = confluent if settings.client == "confluent" else kafka_python
    producer = adapter.open_serving_producer(settings, transactional_id, max_batch_bytes)
    try:
        return adapter.open_serving_consumer(settings), producer
    except BaseException:
        producer.close()
        raise
