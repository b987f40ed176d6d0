"""Topics: create the ones the worker needs, delete the ones a tool made (kafka-python's admin client)."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streamadapt.kafka.kafka_python import client_options
from streamadapt.settings import KafkaSettings

log = logging.getLogger(__name__)


def ensure_topics(settings: KafkaSettings, topics: list[str], single_partition: tuple[str, ...] = ()) -> None:
    """Create missing topics with settings.topic_partitions partitions (one for `single_partition` topics,
    where order matters) and the broker's default replication."""
    admin = KafkaAdminClient(**client_options(settings, "admin"))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics({t: {"num_partitions": 1 if t in single_partition else settings.topic_partitions,
                                         "replication_factor": -1}
                                     for t in missing}, wait_for_metadata=True)
                log.info("created topics %s", ", ".join(missing))
            except TopicAlreadyExistsError:
                pass  # another replica created them first
    finally:
        admin.close()


def max_message_bytes(settings: KafkaSettings, topics: list[str]) -> dict[str, int]:
    """The largest record batch the broker accepts on each of `topics` (max.message.bytes); a topic is left out
    when the broker does not say (a client without the DescribeConfigs permission)."""
    admin = KafkaAdminClient(**client_options(settings, "admin"))
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, None) for topic in topics],
                                           config_filter="all").get("topic", {})
        limits = {}
        for topic in topics:
            value = described.get(topic, {}).get("max.message.bytes", {}).get("value")
            if value is None:
                log.warning("the broker does not say how large a record topic %s accepts", topic)
            else:
                limits[topic] = int(value)
        return limits
    except (KafkaError, ValueError) as error:
        log.warning("cannot read max.message.bytes of topics %s (%s: %s)", ", ".join(topics), type(error).__name__, error)
        return {}
    finally:
        admin.close()


def delete_topics(settings: KafkaSettings, topics: Iterable[str] = (), matching: re.Pattern | None = None) -> list[str]:
    """Delete those of `topics` that exist, and every topic whose whole name `matching` matches; the names
    deleted. For tools that make topics of their own and should not leave them behind: a topic's last
    segment outlives the retention period until it rolls, after a week."""
    admin = KafkaAdminClient(**client_options(settings, "admin"))
    try:
        wanted = set(topics)
        present = sorted(t for t in admin.list_topics() if t in wanted or (matching is not None and matching.fullmatch(t)))
        if present:
            admin.delete_topics(present)
            log.info("deleted topics %s", ", ".join(present))
        return present
    finally:
        admin.close()
