"""Table and property tests of the input contract."""
import json
import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamadapt.core.parsing import InputLimits, Rejection, parse_event
from streamadapt.schemas import PurchaseEvent, RejectReason

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
LIMIT = 16384
LIMITS = InputLimits(max_payload_bytes=LIMIT, max_future_skew_s=3600, max_item_id_chars=256, max_category_chars=256)
VALID = {"event_id": "e-1", "user_id": "u-1", "item_id": "i-1", "category": "books", "price": 12.5,
         "quantity": 2, "currency": "EUR", "ts": "2026-06-01T10:00:00+02:00"}


def parse(raw):
    return parse_event(raw, now=NOW, limits=LIMITS)


def encode(**changes):
    body = {**VALID, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()


def test_valid_event_parses_with_defaults_and_ignores_extra_fields():
    event = parse(encode(category=_DROP, currency=_DROP, surprise={"nested": [1]}))
    assert isinstance(event, PurchaseEvent)
    assert (event.category, event.currency, event.schema_version) == ("unknown", "USD", 1)
    assert event.ts == datetime(2026, 6, 1, 8, 0, tzinfo=timezone.utc)


def test_ts_s_is_the_event_time_of_the_event_and_of_its_copies_with_another_ts():
    event = parse(encode())
    assert event.ts_s == event.ts_s == datetime(2026, 6, 1, 8, 0, tzinfo=timezone.utc).timestamp()
    later = event.model_copy(update={"ts": event.ts + timedelta(hours=1)})  # after ts_s was read and kept
    assert later.ts_s - event.ts_s == 3600.0
    assert event.model_copy(update={"ts": event.ts}, deep=True).ts_s == event.ts_s
    assert later != event and event == parse(encode())  # the kept value is not a field


@pytest.mark.parametrize("raw, reason", [
    (None, RejectReason.EMPTY_PAYLOAD),
    (b"", RejectReason.EMPTY_PAYLOAD),
    (b"x" * (LIMIT + 1), RejectReason.PAYLOAD_TOO_LARGE),
    (b"not json", RejectReason.INVALID_JSON),
    (b'{"event_id": "e"', RejectReason.INVALID_JSON),
    (b"\xff\xfe\x00garbage", RejectReason.INVALID_JSON),
    (b"[" * 1500 + b"]" * 1500, RejectReason.INVALID_JSON),  # deeper than the parser allows
    (b"[1, 2]", RejectReason.NOT_AN_OBJECT),
    (b'"a string"', RejectReason.NOT_AN_OBJECT),
    (encode(event_id=_DROP), RejectReason.MISSING_FIELD),
    (encode(ts=_DROP), RejectReason.MISSING_FIELD),
    (encode(price="12.5"), RejectReason.WRONG_TYPE),
    (encode(quantity=1.5), RejectReason.WRONG_TYPE),
    (encode(quantity=True), RejectReason.WRONG_TYPE),
    (encode(user_id=42), RejectReason.WRONG_TYPE),
    (encode(ts=1780000000), RejectReason.WRONG_TYPE),
    (encode(price=0), RejectReason.INVALID_VALUE),
    (encode(price=-3), RejectReason.INVALID_VALUE),
    (encode(quantity=0), RejectReason.INVALID_VALUE),
    (encode(quantity=10**30), RejectReason.INVALID_VALUE),
    (encode(event_id=""), RejectReason.INVALID_VALUE),
    (encode(event_id="x" * 129), RejectReason.FIELD_TOO_LONG),
    (encode(currency="euro"), RejectReason.INVALID_VALUE),
    (encode(price=float("nan")), RejectReason.NON_FINITE_NUMBER),  # json.dumps writes NaN
    (encode(price=float("inf")), RejectReason.NON_FINITE_NUMBER),
    (b'{"event_id":"e","user_id":"u","item_id":"i","price":1e999,"quantity":1,"ts":"2026-01-01T00:00:00Z"}',
     RejectReason.NON_FINITE_NUMBER),
    (encode(ts="2026-06-01T10:00:00"), RejectReason.INVALID_TIMESTAMP),
    (encode(ts="yesterday"), RejectReason.INVALID_TIMESTAMP),
    (encode(ts="2026-06-01T14:00:01Z"), RejectReason.FUTURE_TIMESTAMP),
    (encode(ts="0001-01-01T00:00:00+23:59"), RejectReason.PAST_TIMESTAMP),  # no UTC equivalent at all
    (encode(ts="1969-12-31T23:59:59Z"), RejectReason.PAST_TIMESTAMP),
    (encode(ts="1970-01-01T00:59:59+01:00"), RejectReason.PAST_TIMESTAMP),
    (encode(item_id="i" * 257), RejectReason.FIELD_TOO_LONG),  # the worker's default limit
    (encode(category="c" * 257), RejectReason.FIELD_TOO_LONG),
    (encode(category="c" * 5000), RejectReason.FIELD_TOO_LONG),  # beyond the schema's own ceiling
    (encode(country="x" * 129), RejectReason.FIELD_TOO_LONG),
    (encode(session_id="s" * 129), RejectReason.FIELD_TOO_LONG),
    (encode(schema_version=2), RejectReason.UNSUPPORTED_SCHEMA_VERSION),
    (json.dumps({"schema_version": 7}).encode(), RejectReason.UNSUPPORTED_SCHEMA_VERSION),
])
def test_contract_breaking_input_is_rejected_with_its_reason(raw, reason):
    result = parse(raw)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail
    assert result.detail


def test_timestamp_within_the_allowed_skew_is_accepted():
    assert isinstance(parse(encode(ts=(NOW + timedelta(minutes=59)).isoformat())), PurchaseEvent)


def test_the_earliest_event_time_and_the_longest_fields_are_accepted():
    event = parse(encode(ts="1970-01-01T01:00:00+01:00", item_id="i" * 256, category="c" * 256, country="x" * 128))
    assert isinstance(event, PurchaseEvent), event
    assert event.ts_s == 0.0


def test_null_optional_fields_take_their_defaults():
    event = parse(encode(category=None, currency=None, country=None))
    assert (event.category, event.currency, event.country) == ("unknown", "USD", None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(raw):
    assert isinstance(parse(raw), (PurchaseEvent, Rejection))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(VALID) + ["schema_version", "country"]), json_values))
def test_arbitrary_objects_are_either_valid_events_or_rejections(fields):
    result = parse(json.dumps(fields).encode())
    if isinstance(result, PurchaseEvent):
        assert result.price > 0 and math.isfinite(result.price) and result.quantity >= 1
        assert result.ts.tzinfo is not None
    else:
        assert isinstance(result.reason, RejectReason)


@settings(max_examples=200, deadline=None)
@given(price=st.floats(min_value=1e-6, max_value=1e12), quantity=st.integers(1, 10**6),
       minutes_ago=st.integers(0, 10**7), event_id=st.text(min_size=1, max_size=128))
def test_every_valid_event_parses_back_to_its_values(price, quantity, minutes_ago, event_id):
    ts = NOW - timedelta(minutes=minutes_ago)
    event = parse(json.dumps({**VALID, "price": price, "quantity": quantity, "ts": ts.isoformat(),
                              "event_id": event_id}).encode())
    assert isinstance(event, PurchaseEvent), event
    assert (event.price, event.quantity, event.ts, event.event_id) == (price, quantity, ts, event_id)


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000])
def test_deeply_nested_json_is_refused_without_recursing(raw):
    rejection = parse_event(raw, now=NOW, limits=InputLimits(max_payload_bytes=len(raw), max_future_skew_s=3600))
    assert isinstance(rejection, Rejection) and rejection.reason is RejectReason.INVALID_JSON
