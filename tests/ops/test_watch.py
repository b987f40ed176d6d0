"""`streamadapt watch` follows a /metrics endpoint: here one served by a small HTTP server of the test's own."""
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamadapt.ops.watch import handled, metric_totals, watch


@contextmanager
def metrics_server(counts: list[int], answers: int | None = None):
    """Serves streamadapt_events_consumed_total over two label sets: `counts` in turn (the last one repeats)
    plus 1; of those, all but 3 are handled: one dead-lettered, one duplicate, the rest predicted, and 3 in a
    batch not committed yet. After `answers` scrapes it answers 503, as a stopped worker's port would not
    answer at all."""
    state = {"scrapes": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            scrape = state["scrapes"]
            state["scrapes"] += 1
            if answers is not None and scrape >= answers:
                self.send_error(503)
                return
            consumed = counts[min(scrape, len(counts) - 1)]
            body = ("# TYPE streamadapt_events_consumed_total counter\n"
                    f'streamadapt_events_consumed_total{{topic="a"}} {consumed}\n'
                    'streamadapt_events_consumed_total{topic="b"} 1\n'
                    f'streamadapt_predictions_total{{task="t"}} {max(0, consumed + 1 - 5)}\n'
                    'streamadapt_events_dead_lettered_total{reason="r"} 1\n'
                    'streamadapt_events_duplicate_total 1\n').encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def quiet(line):
    pass


def test_totals_sum_a_counter_over_its_labels():
    with metrics_server([41]) as url:
        assert metric_totals(url)["streamadapt_events_consumed_total"] == 42


def test_it_stops_once_the_records_are_handled_not_merely_consumed():
    lines = []
    with metrics_server([0, 10, 99, 102]) as url:  # 100 consumed at the third scrape, 100 handled at the fourth
        final = watch(url, until_handled=100, timeout_s=30, interval_s=0.01, out=lines.append)
    assert final["consumed"] == 103 and handled(final) == 100 and len(lines) == 4 and final["mean_rate_per_s"] > 0
    assert lines[-1].startswith("consumed=    103")


def test_a_timeout_before_the_records_are_handled_is_an_error():
    with metrics_server([0, 5]) as url:
        with pytest.raises(RuntimeError, match=r"^3 of 1,000 records handled \(6 consumed\) when --timeout-s 0.3 ran out$"):
            watch(url, until_handled=1000, timeout_s=0.3, interval_s=0.01, out=quiet)


def test_without_a_target_the_timeout_ends_it_quietly():
    with metrics_server([3]) as url:
        assert watch(url, until_handled=None, timeout_s=0.2, interval_s=0.05, out=quiet)["consumed"] == 4


def test_a_worker_that_stops_answering_is_an_error_not_a_wait():
    lines = []
    with metrics_server([6], answers=2) as url:
        with pytest.raises(RuntimeError, match=r"has not answered for 1 s \(did the worker stop\?\); 7 records consumed"):
            watch(url, until_handled=100, timeout_s=30, interval_s=0.05, out=lines.append, lost_after_s=1.0)
    assert lines[0].startswith("consumed=      7") and lines[-1].startswith("waiting for ")


def test_a_worker_not_up_yet_is_waited_for():
    lines = []
    with metrics_server([0], answers=0) as url:  # it never answered: it is starting, not lost
        watch(url, until_handled=None, timeout_s=0.2, interval_s=0.05, out=lines.append, lost_after_s=0.01)
    assert lines and all(line.startswith("waiting for ") for line in lines)
