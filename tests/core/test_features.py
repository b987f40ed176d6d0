import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamadapt.core.features import (
    COUNT_DECAY,
    FREQUENCY_PRIOR,
    MAX_TRACKED_CATEGORIES,
    NEVER_DAYS,
    NUMERIC_FEATURES,
    OBSERVED_CAP_DAYS,
    OTHER,
    PER_CLASS_FEATURES,
    USER_MEMORY_DAYS,
    CategoryFeatures,
    FeatureSpec,
    UserState,
    advance,
    encode,
)
from streamadapt.core.plugin import encode_stream
from streamadapt.schemas import PurchaseEvent

SPEC = FeatureSpec(("books", "music", "toys"), (0.4, 0.3, 0.2, 0.1))
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)  # a Monday


def event(category="books", price=10.0, quantity=1, hours=0.0, event_id="e"):
    return PurchaseEvent(event_id=event_id, user_id="u", item_id="i", category=category, price=price,
                         quantity=quantity, ts=T0 + timedelta(hours=hours))


def named(row):
    return dict(zip(SPEC.feature_names(), row.tolist()))


def test_spec_layout():
    assert SPEC.vocabulary == ("books", "music", "toys", OTHER)
    assert SPEC.class_block_width == 4 * len(PER_CLASS_FEATURES)
    assert SPEC.n_features == 4 * len(PER_CLASS_FEATURES) + 4 + len(NUMERIC_FEATURES) == len(SPEC.feature_names())
    assert SPEC.feature_names()[:2] == ["log_frequency[books]", "is_this_purchase[books]"]
    assert SPEC.feature_names()[SPEC.class_block_width] == "category=books"
    assert SPEC.index_of("garden") == SPEC.index_of(OTHER) == 3
    assert FeatureSpec.from_json(SPEC.to_json()) == SPEC


def test_class_frequencies_must_cover_the_vocabulary():
    with pytest.raises(ValueError, match="4 positive numbers"):
        FeatureSpec(("books", "music", "toys"), (0.5, 0.5))
    assert FeatureSpec(("books",)).to_json()["class_frequencies"] == []  # uniform


def test_a_spec_of_other_feature_code_is_refused_with_what_differs():
    older = {**SPEC.to_json(), "numeric_features": list(NUMERIC_FEATURES[:-1])}
    with pytest.raises(ValueError, match=f"without {NUMERIC_FEATURES[-1]}\\): pretrain it again"):
        FeatureSpec.from_json(older)


def test_first_purchase_features():
    f = named(encode([(UserState(), event("music", price=math.e - 1, quantity=3))], SPEC, 0.0)[0])
    assert f["category=music"] == 1.0 and f["category=books"] == 0.0
    assert f["is_this_purchase[music]"] == 1.0 and f["is_this_purchase[books]"] == 0.0
    for c, frequency in zip(SPEC.vocabulary, (0.4, 0.3, 0.2, 0.1)):  # everybody's, and this purchase
        own = 1.0 if c == "music" else 0.0
        assert f[f"log_frequency[{c}]"] == pytest.approx(math.log((own + 5 * frequency) / (1 + 5)), rel=1e-6)
        assert f[f"recent_share[{c}]"] == 0.0 and f[f"never_bought[{c}]"] == 1.0
        assert f[f"log_days_since[{c}]"] == pytest.approx(math.log1p(NEVER_DAYS))
    assert f["is_first_purchase"] == 1.0 and f["log_purchases_before"] == 0.0
    assert f["log_price"] == pytest.approx(1.0)
    assert f["log_quantity"] == pytest.approx(math.log(4))


@pytest.mark.parametrize("history, expected_shares", [
    (["books"], {"books": 1.0}),
    (["books", "books"], {"books": 1.0}),
    (["books", "music"], {"books": 0.85 / 1.85, "music": 1 / 1.85}),
    (["garden"], {OTHER: 1.0}),
    (["garden", "fishing"], {OTHER: 1.0}),  # categories the model does not know share OTHER
])
def test_user_category_shares_decay_with_age(history, expected_shares):
    state = UserState()
    for i, category in enumerate(history):
        state = advance(state, event(category, hours=i))
    f = named(encode([(state, event(hours=len(history)))], SPEC, 0.0)[0])
    for category in SPEC.vocabulary:
        assert f[f"recent_share[{category}]"] == pytest.approx(expected_shares.get(category, 0.0))


def test_a_users_frequencies_are_their_own_purchases_smoothed_toward_everybodys():
    # three books on days 0, 1, 2, then a toy on day 5; music on day 10
    state = UserState()
    for day, category in ((0, "books"), (1, "books"), (2, "books"), (5, "toys")):
        state = advance(state, event(category, hours=24 * day))
    f = named(encode([(state, event("music", hours=24 * 10))], SPEC, 0.0)[0])
    books = COUNT_DECAY ** 3 + COUNT_DECAY ** 2 + COUNT_DECAY
    total = books + 1.0 + 1.0  # this purchase, of music, counts too
    for category, own, frequency in (("books", books, 0.4), ("toys", 1.0, 0.2), ("music", 1.0, 0.3)):
        for name, strength in (("log_frequency", FREQUENCY_PRIOR), ("log_frequency_tight", 0.5),
                               ("log_frequency_loose", 50.0)):
            expected = (own + strength * frequency) / (total + strength)
            assert f[f"{name}[{category}]"] == pytest.approx(math.log(expected), rel=1e-5)
        assert f[f"log_history[{category}]"] == pytest.approx(math.log1p(total), rel=1e-6)  # the same in every class
    assert f["log_days_since[books]"] == pytest.approx(math.log1p(8)) and f["never_bought[books]"] == 0.0
    assert f["log_days_since[toys]"] == pytest.approx(math.log1p(5))
    assert f["never_bought[music]"] == 1.0 and f["is_this_purchase[music]"] == 1.0


@pytest.mark.parametrize("days_after, expected_days", [(10.0, 10.0), (-2.0, 0.0), (OBSERVED_CAP_DAYS + 50, OBSERVED_CAP_DAYS)])
def test_the_history_watched_is_counted_from_when_states_were_first_kept(days_after, expected_days):
    observed_since_s = event().ts_s - days_after * 86400.0
    f = named(encode([(UserState(), event())], SPEC, observed_since_s)[0])
    assert f["log_days_observed"] == pytest.approx(math.log1p(expected_days))


def test_history_watched_stops_counting_at_the_specs_cap():
    spec = FeatureSpec(SPEC.categories, SPEC.class_frequencies, observed_cap_days=20.0)
    f = named(encode([(UserState(), event())], spec, event().ts_s - 60 * 86400.0)[0])
    assert f["log_days_observed"] == pytest.approx(math.log1p(20.0))
    assert FeatureSpec.from_json(spec.to_json()).observed_cap_days == 20.0


def test_a_stream_is_watched_from_its_first_event():
    rows = [named(row) for row in encode_stream([event(hours=0, event_id="a"), event(hours=48, event_id="b")], CategoryFeatures(SPEC))]
    assert [f["log_days_observed"] for f in rows] == [0.0, pytest.approx(math.log1p(2))]


@pytest.mark.parametrize("idle_days, remembered", [(30.0, True), (USER_MEMORY_DAYS, True), (USER_MEMORY_DAYS + 1, False)])
def test_a_user_idle_for_longer_than_the_memory_is_seen_as_new(idle_days, remembered):
    rows = [named(row) for row in encode_stream([event(hours=0, event_id="a"), event(hours=24 * idle_days, event_id="b")],
                                                CategoryFeatures(SPEC))]
    assert rows[1]["is_first_purchase"] == (0.0 if remembered else 1.0)
    assert rows[1]["log_purchases_before"] == pytest.approx(math.log(2) if remembered else 0.0)
    assert rows[1]["log_days_observed"] == pytest.approx(math.log1p(min(idle_days, OBSERVED_CAP_DAYS)))  # still watched


def test_a_checkpoint_pretrained_before_forgetting_existed_never_forgets():
    older = {key: value for key, value in SPEC.to_json().items() if key != "user_memory_days"}
    spec = FeatureSpec.from_json(older)
    assert spec.user_memory_days is None and SPEC.user_memory_days == USER_MEMORY_DAYS
    old_state = advance(UserState(), event(hours=0))
    assert spec.recall(old_state, event(hours=24 * 10 * USER_MEMORY_DAYS).ts_s) is old_state
    assert SPEC.recall(old_state, event(hours=24 * 10 * USER_MEMORY_DAYS).ts_s) == UserState()
    assert SPEC.recall(None, 0.0) == UserState()


def test_gap_and_counts_come_from_event_time():
    state = advance(UserState(), event(hours=0))
    f = named(encode([(state, event(hours=24))], SPEC, 0.0)[0])
    assert f["log_hours_since_last"] == pytest.approx(math.log1p(24))
    assert f["is_first_purchase"] == 0.0 and f["log_purchases_before"] == pytest.approx(math.log(2))
    late = named(encode([(state, event(hours=-5))], SPEC, 0.0)[0])  # an out-of-order event does not give a negative gap
    assert late["log_hours_since_last"] == 0.0


def test_a_users_repeat_rates_count_the_gaps_between_their_purchases_within_each_span():
    state = UserState()
    for hours in (0, 24 * 3, 24 * 50, 24 * 500):  # gaps of 3, 47 and 450 days
        state = advance(state, event(hours=hours))
    assert state.repeats == (1, 1, 2, 2)
    f = named(encode([(state, event(hours=24 * 501))], SPEC, 0.0)[0])
    assert [f[f"repeat_within_{days}d"] for days in (7, 30, 90, 365)] == pytest.approx(
        [(count + 0.5) / (3 + 1) for count in (1, 1, 2, 2)])
    first = named(encode([(UserState(), event())], SPEC, 0.0)[0])  # no gap yet: a half, uninformed
    assert [first[f"repeat_within_{days}d"] for days in (7, 30, 90, 365)] == [0.5] * 4


def test_a_state_of_the_earlier_feature_code_is_refused():
    state = advance(UserState(), event())
    with pytest.raises(ValueError, match="not a user state"):
        UserState.from_json(state.to_json()[:6])


def test_encode_does_not_mutate_state_and_advance_returns_new_state():
    state = advance(UserState(), event())
    before = state.to_json()
    encode([(state, event("toys"))], SPEC, 0.0)[0]
    advanced = advance(state, event("toys"))
    assert state.to_json() == before and advanced is not state


def test_state_round_trips_through_json():
    state = advance(advance(UserState(), event("books")), event("toys", hours=3))
    assert UserState.from_json(state.to_json()) == state


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=6), st.floats(0.01, 1e9), st.integers(1, 2**31 - 1),
                          st.floats(-1e4, 1e4)), min_size=1, max_size=60))
def test_state_stays_bounded_and_features_finite(purchases):
    state = UserState()
    for category, price, quantity, hours in purchases:
        e = event(category, price=price, quantity=quantity, hours=hours)
        row = encode([(state, e)], SPEC, 0.0)[0]
        assert row.dtype == np.float32 and np.all(np.isfinite(row))
        state = advance(state, e)
    assert len(state.categories) <= MAX_TRACKED_CATEGORIES
    assert state.purchases == len(purchases)


def test_a_batch_encodes_each_row_as_if_alone():
    history = [event("books"), event("garden", hours=1), event("toys", hours=2), event("fishing", hours=30)]
    pairs, state = [], UserState()
    for e in history:
        pairs.append((state, e))
        state = advance(state, e)
    together = encode(pairs, SPEC, 0.0)
    for i, pair in enumerate(pairs):
        np.testing.assert_array_equal(together[i], encode([pair], SPEC, 0.0)[0])
    assert encode([], SPEC, 0.0).shape == (0, SPEC.n_features)


def test_weekday_is_read_in_the_events_own_time_zone():
    # Monday 23:30 in UTC is already Tuesday 05:00 in India: the weekday follows the offset written in ts.
    utc = PurchaseEvent(event_id="e", user_id="u", item_id="i", price=1.0, quantity=1, ts=T0.replace(hour=23, minute=30))
    india = utc.model_copy(update={"ts": utc.ts.astimezone(timezone(timedelta(hours=5, minutes=30)))})
    for e, weekday in ((utc, 0 + 23.5 / 24), (india, 1 + 5 / 24)):
        f = named(encode([(UserState(), e)], SPEC, 0.0)[0])
        angle = weekday / 7 * 2 * math.pi
        assert (f["weekday_sin"], f["weekday_cos"]) == (pytest.approx(math.sin(angle), abs=1e-6),
                                                        pytest.approx(math.cos(angle), abs=1e-6))
