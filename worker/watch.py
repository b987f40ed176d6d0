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
}


def scrape(url: str) -> dict[str, float]:
    """Totals of the SHOWN counters (summed over labels) from one scrape of `url`."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    totals = dict.fromkeys(SHOWN, 0.0)
    wanted = {sample: name for name, sample in SHOWN.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[wanted[sample.name]] += sample.value
    return totals


def watch(url: str, until_consumed: int | None, timeout_s: float, interval_s: float = 1.0, out=print) -> dict[str, float]:
    """Print a line per interval until `until_consumed` records are consumed or `timeout_s` passes."""
    started = time.monotonic()
    first: tuple[float, float] | None = None
    last = dict.fromkeys(SHOWN, 0.0)
    previous = (started, 0.0)
    while time.monotonic() - started < timeout_s:
        try:
            last = scrape(url)
        except (urllib.error.URLError, OSError) as error:
            out(f"waiting for {url}: {error}")
            time.sleep(interval_s)
            continue
        now = time.monotonic()
        if first is None and last["consumed"] > 0:
            first = (now, last["consumed"])
        rate = (last["consumed"] - previous[1]) / max(1e-9, now - previous[0])
        previous = (now, last["consumed"])
        out("  ".join(f"{k}={int(v):>7}" for k, v in last.items()) + f"  rate={rate:>7.0f}/s")
        if until_consumed is not None and last["consumed"] >= until_consumed:
            break
        time.sleep(interval_s)
    if first is not None and previous[0] > first[0]:
        last["mean_rate_per_s"] = (last["consumed"] - first[1]) / (previous[0] - first[0])
    return last
