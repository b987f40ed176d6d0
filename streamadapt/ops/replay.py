"""`streamadapt replay`: produce a JSONL event file, line by line and unchanged, into the input topic."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from streamadapt.kafka.admin import ensure_topics
from streamadapt.kafka.kafka_python import open_producer
from streamadapt.settings import KafkaSettings


def record_key(line: bytes) -> bytes | None:
    """The user_id of a line as the record key (so a user's events keep their order), or None if unreadable."""
    try:
        user_id = json.loads(line).get("user_id")
    except (ValueError, AttributeError):
        return None
    return user_id.encode() if isinstance(user_id, str) else None


def replay(path: Path, settings: KafkaSettings, rate_per_s: float | None = None,
           on_progress: Callable[[int], None] | None = None, sleep=time.sleep) -> tuple[int, float]:
    """Send every non-empty line of `path`; at most `rate_per_s` lines per second if given.

    Returns (records sent and acknowledged, seconds taken).
    """
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError("--rate must be > 0 events per second")
    ensure_topics(settings, [settings.input_topic])
    producer = open_producer(settings)
    started = time.monotonic()
    sent = 0
    try:
        with path.open("rb") as lines:
            for line in lines:
                line = line.rstrip(b"\r\n")
                if not line:
                    continue
                if rate_per_s is not None:
                    due = started + sent / rate_per_s
                    delay = due - time.monotonic()
                    if delay > 0:
                        sleep(delay)
                producer.send(settings.input_topic, key=record_key(line), value=line)
                sent += 1
                if on_progress is not None and sent % 10_000 == 0:
                    on_progress(sent)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)
    return sent, time.monotonic() - started
