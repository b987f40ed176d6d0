"""`streamadapt watch`: follow a worker's /metrics and print progress once a second."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SHOWN = {
    "consumed": "streamadapt_events_consumed_total",
    "predicted": "streamadapt_predictions_total",
    "dead_lettered": "streamadapt_events_dead_lettered_total",
    "duplicates": "streamadapt_events_duplicate_total",
    "labels": "streamadapt_labels_resolved_total",
    "swaps": "streamadapt_model_swaps_total",
    "paced": "streamadapt_paced_partitions",  # partitions waiting for the trainer or the slowest one (a replay)
}


def metric_totals(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """One scrape of a /metrics `url`: each sample's value summed over its label sets, except histogram
    buckets, kept apart per bound as `name{le}` (e.g. `..._bucket{0.005}`). Raises OSError when the
    URL does not answer."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = f"{sample.name}{{{sample.labels['le']}}}" if sample.name.endswith("_bucket") else sample.name
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def scrape(url: str) -> dict[str, float]:
    """Totals of the SHOWN counters (summed over labels) from one scrape of `url`."""
    totals = metric_totals(url)
    return {name: totals.get(sample, 0.0) for name, sample in SHOWN.items()}


# Once a worker has answered, this long without an answer means it is gone (a crash, a stop), not starting.
LOST_AFTER_S = 30.0


HANDLED = ("predicted", "dead_lettered", "duplicates")  # a record is counted in one of these once it is committed


def handled(totals: dict[str, float]) -> int:
    """Records committed with an outcome: predicted (replays too), dead-lettered, or dropped as duplicates."""
    return int(sum(totals[name] for name in HANDLED))


def watch(url: str, until_handled: int | None, timeout_s: float, interval_s: float = 1.0, out=print,
          lost_after_s: float = LOST_AFTER_S) -> dict[str, float]:
    """Print a line per interval until `until_handled` records are handled (`handled`: consumed is not enough,
    a record is consumed before its batch commits) or `timeout_s` passes; the last totals. Raises RuntimeError
    when `until_handled` is not reached in time, or when the worker, having answered, stops answering for
    `lost_after_s`: a script waiting on it fails rather than carrying on."""
    started = time.monotonic()
    first: tuple[float, float] | None = None
    last = dict.fromkeys(SHOWN, 0.0)
    previous = (started, 0.0)
    answered_at: float | None = None
    while time.monotonic() - started < timeout_s:
        try:
            last = scrape(url)
        except (urllib.error.URLError, OSError) as error:
            if answered_at is not None and time.monotonic() - answered_at > lost_after_s:
                raise RuntimeError(f"{url} has not answered for {lost_after_s:.0f} s (did the worker stop?); "
                                   f"{_consumed(last)} records consumed before") from error
            out(f"waiting for {url}: {error}")
            time.sleep(interval_s)
            continue
        now = answered_at = time.monotonic()
        if first is None and last["consumed"] > 0:
            first = (now, last["consumed"])
        rate = (last["consumed"] - previous[1]) / max(1e-9, now - previous[0])
        previous = (now, last["consumed"])
        out("  ".join(f"{k}={int(v):>7}" for k, v in last.items()) + f"  rate={rate:>7.0f}/s")
        if until_handled is not None and handled(last) >= until_handled:
            break
        time.sleep(interval_s)
    else:
        if until_handled is not None:
            raise RuntimeError(f"{handled(last):,} of {until_handled:,} records handled ({_consumed(last)} consumed) "
                               f"when --timeout-s {timeout_s:g} ran out")
    if first is not None and previous[0] > first[0]:
        last["mean_rate_per_s"] = (last["consumed"] - first[1]) / (previous[0] - first[0])
    return last


def _consumed(totals: dict[str, float]) -> str:
    return f"{int(totals['consumed']):,}"
