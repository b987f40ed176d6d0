"""Latency at a fixed offered rate, timed from each event's *scheduled* send time.

Event k of a row is due at t0 + k / rate. Its latency runs from that moment to the moment a reader of the
output topic receives its output, so a generator that falls behind, or a consumer that stalls it, cannot
hide a stall (no coordinated omission). Three processes share the machine with what they measure:
- the generator has its payloads ready before t0 and sends with no linger (librdkafka, in C);
- the reader takes each output as soon as it is fetched, never waiting to fill a batch;
- the contender: a real worker, or a bare loop (`bare_loop`) that forwards each input to the output topic.
The bare loops are the floor a worker on the same client stands on; ratios to them travel between machines.
"""
from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SLICE_S = 10.0  # p99 is also reported per slice of this many seconds of schedule, so one stall shows as one
WARMUP_S = 2.0  # events due in the first seconds are sent and must arrive, but are not timed (connections)
GRACE_S = 30.0  # after the last event is due, how long the reader waits for the missing outputs
START_DELAY_S = 1.5  # from launching the generator and reader to t0: both are ready by then
GENERATOR_TICK_S = 0.0005  # the generator sleeps at most this long between sends that are due


@dataclass(frozen=True)
class LatencyRow:
    contender: str
    offered_events_per_s: float
    seconds: float
    sent: int
    received: int
    missing: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    p99_ms_per_slice: list[float]
    generator_behind_max_ms: float  # how late the generator sent its latest event: its own stall, included above

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(contender: str, rate: float, seconds: float, received_at: np.ndarray, t0: float,
              generator_behind_max_s: float, among: np.ndarray | None = None) -> LatencyRow:
    """The row of one run: `received_at[k]` is when event k's output arrived (wall clock; NaN if it did not),
    and event k was due at t0 + k / rate; with `among` (a mask), of those events only. Pure."""
    n = len(received_at)
    due = t0 + np.arange(n) / rate
    latency_ms = (received_at - due) * 1000.0
    among = np.ones(n, bool) if among is None else among
    timed = (due >= t0 + WARMUP_S) & np.isfinite(received_at) & among
    timed_ms = latency_ms[timed]
    if timed_ms.size:
        p50, p99, p999 = (float(v) for v in np.percentile(timed_ms, [50, 99, 99.9]))
        worst = float(timed_ms.max())
    else:
        p50 = p99 = p999 = worst = float("nan")
    slices = []
    for start in np.arange(WARMUP_S, seconds, SLICE_S):
        in_slice = timed & (due >= t0 + start) & (due < t0 + start + SLICE_S)
        slices.append(float(np.percentile(latency_ms[in_slice], 99)) if in_slice.any() else float("nan"))
    sent = int(among.sum())
    received = int((np.isfinite(received_at) & among).sum())
    return LatencyRow(contender, rate, seconds, sent, received, sent - received, p50, p99, p999, worst, slices,
                      generator_behind_max_s * 1000.0)


@dataclass(frozen=True)
class Measured:
    """One run's raw stamps, and its row."""

    contender: str
    rate: float
    seconds: float
    t0: float
    received_at: np.ndarray
    generator_behind_max_s: float

    @property
    def row(self) -> LatencyRow:
        return self.part(None)

    def part(self, among: np.ndarray | None) -> LatencyRow:
        return summarize(self.contender, self.rate, self.seconds, self.received_at, self.t0,
                         self.generator_behind_max_s, among)

    def due_within(self, intervals: list[tuple[float, float]]) -> np.ndarray:
        """Which events were due within any of the wall-clock `intervals`."""
        due = self.t0 + np.arange(len(self.received_at)) / self.rate
        inside = np.zeros(len(due), bool)
        for began, ended in intervals:
            inside |= (due >= began) & (due <= ended)
        return inside


def write_payloads(path: Path, events: int, seed: int = 97) -> None:
    """`events` generated purchases, one JSON line each, with event ids unique to this file."""
    from streamadapt.ops.generate import generate_events

    run = uuid.uuid4().hex[:8]
    with path.open("w") as out:
        for k, event in enumerate(generate_events(events=events, market="target", seed=seed)):
            out.write(json.dumps({**event, "event_id": f"lat-{run}-{k}"}) + "\n")


def measure(bootstrap: str, input_topic: str, output_topic: str, payloads: Path, rate: float, seconds: float,
            contender: str) -> Measured:
    """Send the first rate x seconds lines of `payloads` to `input_topic` on schedule, read their outputs
    from `output_topic`, and summarize. The contender must already be reading `input_topic`."""
    n = int(rate * seconds)
    context = multiprocessing.get_context("spawn")  # no inherited threads or client state from this process
    t0 = time.time() + START_DELAY_S
    to_reader, from_reader = context.Pipe()
    to_generator, from_generator = context.Pipe()
    reader = context.Process(target=_read, args=(bootstrap, output_topic, str(payloads), n, t0 + seconds + GRACE_S,
                                                 to_reader), daemon=True)
    generator = context.Process(target=_generate, args=(bootstrap, input_topic, str(payloads), n, rate, t0,
                                                        to_generator), daemon=True)
    reader.start()
    generator.start()
    try:
        behind_s = _answer(from_generator, generator, seconds + GRACE_S + 60)
        received_at = _answer(from_reader, reader, GRACE_S + 60)
    finally:
        for process in (generator, reader):
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return Measured(contender, rate, seconds, t0, received_at, behind_s)


def _answer(conn, process, timeout_s: float):
    if not conn.poll(timeout_s):
        raise RuntimeError(f"latency bench: the {process.name} process sent nothing in {timeout_s:.0f} s")
    answer = conn.recv()
    if isinstance(answer, str):
        raise RuntimeError(f"latency bench: {answer}")
    return answer


def _keyed(payloads: str, n: int) -> list[tuple[bytes, bytes]]:
    lines = Path(payloads).read_bytes().splitlines()[:n]
    if len(lines) < n:
        raise ValueError(f"{payloads} has {len(lines)} events, the row needs {n}")
    return [(json.loads(line)["user_id"].encode(), line) for line in lines]  # keyed by user_id, as producers of the input topic are asked to


def _generate(bootstrap: str, topic: str, payloads: str, n: int, rate: float, t0: float, conn) -> None:
    """Send event k at t0 + k / rate (in its own process). Answers the latest it sent any event, in seconds."""
    try:
        from confluent_kafka import Producer

        records = _keyed(payloads, n)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0,
                             "partitioner": "murmur2_random", "queue.buffering.max.messages": 1_000_000})
        producer.poll(0)
        behind, k = 0.0, 0
        time.sleep(max(0.0, t0 - time.time()))
        while k < n:
            now = time.time()
            due = min(n, int((now - t0) * rate) + 1)
            if due > k:
                behind = max(behind, now - (t0 + (due - 1) / rate))
                for key, value in records[k:due]:
                    producer.produce(topic, value=value, key=key)
                k = due
            producer.poll(0)
            time.sleep(min(GENERATOR_TICK_S, max(0.0, t0 + k / rate - time.time())))
        if producer.flush(60) > 0:
            raise RuntimeError("the generator could not deliver every event")
        conn.send(behind)
    except Exception as error:  # the parent reports it, with the row it spoiled
        conn.send(f"generator: {type(error).__name__}: {error}")


def _read(bootstrap: str, topic: str, payloads: str, n: int, deadline: float, conn) -> None:
    """Stamp the arrival of each event's output (in its own process); answers the stamps by event index."""
    try:
        from confluent_kafka import Consumer, TopicPartition

        index = {json.loads(line)["event_id"]: k for k, line in enumerate(Path(payloads).read_bytes().splitlines()[:n])}
        received = np.full(n, np.nan)
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-latency-{uuid.uuid4().hex[:8]}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 1, "fetch.min.bytes": 1})
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])  # no group join: nothing to wait for
        count = 0
        while count < n and time.time() < deadline:
            message = consumer.poll(0.05)  # returns with the first output fetched, never waits for a batch
            if message is None or message.error() is not None:
                continue
            now = time.time()
            k = index.get(_event_id(message.value()))
            if k is not None and np.isnan(received[k]):
                received[k] = now
                count += 1
        consumer.close()
        conn.send(received)
    except Exception as error:
        conn.send(f"reader: {type(error).__name__}: {error}")


def _event_id(value: bytes) -> str | None:
    try:
        return json.loads(value).get("event_id")
    except ValueError:
        return None


# The bare loops: the least a worker on each client must do per batch, so the floor its latency stands on.
AT_LEAST_ONCE = "at-least-once"  # consume, produce, flush, check every acknowledgement, commit
FIRE_AND_FORGET = "fire-and-forget"  # consume, produce; no wait, no commit: the client's ceiling


def bare_loop(client: str, mode: str, bootstrap: str, input_topic: str, output_topic: str, group_id: str,
              max_poll_records: int, stop: Callable[[], bool],
              on_batch: Callable[[int, float], None] = lambda n, polled_at: None,
              on_assigned: Callable[[], None] = lambda: None) -> None:
    """Forward every input record to `output_topic` (same key, same value) until `stop()`. `on_batch(n,
    polled_at)` is called once each batch of n records is handled, with the perf_counter when it was polled;
    `on_assigned()` once, when the loop first owns a partition."""
    if client == "confluent":
        loop = _bare_confluent
    elif client == "kafka-python":
        loop = _bare_kafka_python
    else:
        raise ValueError(f"unknown client {client!r}")
    loop(mode, bootstrap, input_topic, output_topic, group_id, max_poll_records, stop, on_batch, _once(on_assigned))


def _once(call: Callable[[], None]) -> Callable[[], None]:
    done = []

    def first() -> None:
        if not done:
            done.append(True)
            call()
    return first


def _bare_kafka_python(mode, bootstrap, input_topic, output_topic, group_id, max_poll_records, stop, on_batch,
                       on_assigned):
    from kafka import KafkaConsumer, KafkaProducer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=max_poll_records)
    # Subscribed before the new topic shows in its metadata, the consumer joins with nothing to read and
    # waits for the next metadata refresh (5 minutes): wait for the partitions first, as the worker does.
    while not consumer.partitions_for_topic(input_topic) and not stop():
        consumer.topics()
        time.sleep(0.2)
    consumer.subscribe([input_topic])
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5 if mode == AT_LEAST_ONCE else 20,
                             batch_size=1_000_000, max_request_size=4 << 20)
    try:
        while not stop():
            records = [r for batch in consumer.poll(timeout_ms=100).values() for r in batch]
            polled_at = time.perf_counter()
            if consumer.assignment():
                on_assigned()
            if not records:
                continue
            futures = [producer.send(output_topic, key=r.key, value=r.value) for r in records]
            if mode == AT_LEAST_ONCE:
                producer.flush()
                for future in futures:
                    future.get(timeout=60)
                consumer.commit()
            on_batch(len(records), polled_at)
        producer.flush()
    finally:
        consumer.close()
        producer.close(timeout=10)


def _bare_confluent(mode, bootstrap, input_topic, output_topic, group_id, max_poll_records, stop, on_batch,
                    on_assigned):
    from confluent_kafka import Consumer, KafkaException, Producer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 5})
    failures = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5 if mode == AT_LEAST_ONCE else 20,
                         "partitioner": "murmur2_random", "delivery.report.only.error": True,
                         "on_delivery": lambda error, _: failures.append(error) if error is not None else None})
    consumer.subscribe([input_topic], on_assign=lambda *_: on_assigned())
    try:
        while not stop():
            messages = consumer.consume(max_poll_records, timeout=0)  # what is fetched; else wait for the first
            if not messages:
                first = consumer.poll(0.1)
                messages = [first, *consumer.consume(max_poll_records - 1, timeout=0)] if first is not None else []
            polled_at = time.perf_counter()
            messages = [m for m in messages if m.error() is None]
            if not messages:
                continue
            for m in messages:
                producer.produce(output_topic, value=m.value(), key=m.key())
            if mode == AT_LEAST_ONCE:
                if producer.flush(60) > 0 or failures:
                    raise KafkaException(failures[0] if failures else "outputs not delivered in 60 s")
                consumer.commit(asynchronous=False)
            else:
                producer.poll(0)
            on_batch(len(messages), polled_at)
        producer.flush(60)
    finally:
        consumer.close()


def run_bare_loop(client: str, mode: str, bootstrap: str, input_topic: str, output_topic: str, group_id: str,
                  max_poll_records: int, stop_event, ready_event=None) -> None:
    """`bare_loop` in a process of its own, until `stop_event` (a multiprocessing Event) is set; `ready_event`
    is set once it owns a partition."""
    bare_loop(client, mode, bootstrap, input_topic, output_topic, group_id, max_poll_records, stop_event.is_set,
              on_assigned=ready_event.set if ready_event is not None else lambda: None)
