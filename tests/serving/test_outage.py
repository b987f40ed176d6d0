"""The pause and backoff of streamadapt.serving.outage, with a fake consumer and a fake clock."""
import redis

from streamadapt.metrics import WorkerMetrics
from streamadapt.serving import outage as outage_module
from streamadapt.serving.outage import Outage


class PausingConsumer:
    def __init__(self, clock: list[float]):
        self.clock, self.paused, self.polls = clock, False, []

    def pause_all(self):
        self.paused = True

    def resume_all(self):
        self.paused = False

    def poll(self, timeout_ms, max_records=None):
        self.polls.append(timeout_ms)
        self.clock[0] += timeout_ms / 1000.0
        return []


def test_waits_double_up_to_the_cap_while_paused_and_start_afresh_after_the_end(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(outage_module.time, "monotonic", lambda: clock[0])
    consumer, metrics = PausingConsumer(clock), WorkerMetrics()
    outage = Outage(consumer, metrics, read_again=lambda records: None, polled=lambda: None)
    waited = []
    for _ in range(9):
        start = clock[0]
        outage.wait_out(redis.ConnectionError("Redis is away"), stop=None)
        waited.append(round(clock[0] - start, 3))
    assert waited == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert outage.paused and consumer.paused and metrics.total("streamadapt_consumption_paused") == 1
    assert max(consumer.polls) <= 1000  # polled at least every second: the consumer stays in its group
    outage.end()
    assert not outage.paused and not consumer.paused and metrics.total("streamadapt_consumption_paused") == 0
    start = clock[0]
    outage.wait_out(redis.ConnectionError("Redis is away again"), stop=None)
    assert round(clock[0] - start, 3) == 0.5
