import json
from collections import Counter
from datetime import datetime

from streamadapt.ops.generate import CATEGORIES, generate_events, write_events
from streamadapt.schemas import PurchaseEvent


def test_same_seed_same_stream_and_other_seed_other_stream():
    assert list(generate_events(500, seed=4)) == list(generate_events(500, seed=4))
    assert list(generate_events(500, seed=4)) != list(generate_events(500, seed=5))


def test_events_follow_the_contract_in_event_time_order(tmp_path):
    path = tmp_path / "events.jsonl"
    assert write_events(path, events=2000, market="target", drift_at=1000, seed=1) == 2000
    events = [PurchaseEvent.model_validate(json.loads(line)) for line in path.read_text().splitlines()]
    assert len({e.event_id for e in events}) == 2000
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))
    assert {e.category for e in events} <= set(CATEGORIES)


def test_markets_differ_and_drift_changes_the_mix():
    def mix(events):
        counts = Counter(e["category"] for e in events)
        return {c: counts[c] / len(events) for c in CATEGORIES}

    source, target = list(generate_events(6000, market="source")), list(generate_events(6000, market="target"))
    assert sum(abs(mix(source)[c] - mix(target)[c]) for c in CATEGORIES) > 0.3
    drifting = list(generate_events(8000, market="target", drift_at=4000))
    before, after = mix(drifting[:4000]), mix(drifting[4000:])
    assert sum(abs(before[c] - after[c]) for c in CATEGORIES) > 0.3
    assert datetime.fromisoformat(source[0]["ts"]).year == 2025
