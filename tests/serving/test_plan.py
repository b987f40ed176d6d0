import base64
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamadapt.core.examples import Example
from streamadapt.core.features import (
    USER_MEMORY_DAYS,
    CategoryFeatures,
    FeatureSpec,
    UserState,
    advance,
    encode,
)
from streamadapt.core.parsing import Rejection
from streamadapt.kafka.protocol import InputRecord
from streamadapt.model.checkpoint import FeaturesUsed, ModelMeta
from streamadapt.schemas import DeadLetter, Prediction, PurchaseEvent, RejectReason
from streamadapt.serving.plan import (
    dead_letter_message,
    expire_pendings,
    first_event_time,
    first_offsets,
    make_predictions,
    newest_event_times,
    next_offsets,
    plan_batch,
    replayed_prediction,
    resolved_examples,
    served_examples,
    split_stale,
)
from streamadapt.state.store import EventClaim

SPEC = FeatureSpec(("books", "music"))
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
META = ModelMeta(task="next_category", classes=("books", "music", "<other>"), feature_spec=SPEC,
                 horizon_days=None, sha256="ab" * 32, extra={}, features=FeaturesUsed.built_in(SPEC))
FEATURES = CategoryFeatures(SPEC)


def rec(offset, partition=0, value=b"{}", key=b"u"):
    return InputRecord("purchases", partition, offset, 1_000, key, value)


def claim(record):
    return EventClaim(record, "v0", "2026-03-02T09:00:00Z", 0, 0.5, None, None)


def ev(event_id, user="u1", category="books", hours=0):
    return PurchaseEvent(event_id=event_id, user_id=user, item_id="i", category=category, price=5.0, quantity=1,
                         ts=T0 + timedelta(hours=hours))


def test_fresh_events_chain_each_users_state_in_order():
    valid = [(rec(0), ev("a", hours=0)), (rec(1), ev("b", user="u2")), (rec(2), ev("c", category="music", hours=2))]
    plan = plan_batch(valid, {}, {}, {}, META, FEATURES, 0.0)
    assert [e.event_id for _, e in plan.fresh] == ["a", "b", "c"]
    after_a = advance(UserState(), valid[0][1])
    np.testing.assert_array_equal(plan.features[2], encode([(after_a, valid[2][1])], SPEC, 0.0)[0])
    assert plan.states["u1"] == advance(after_a, valid[2][1]) and plan.states["u2"].purchases == 1


def test_a_stored_state_older_than_the_memory_is_forgotten_and_its_pending_still_resolved():
    stored_state = advance(UserState(), ev("old", category="music", hours=-24 * (USER_MEMORY_DAYS + 30)))
    pending = Example("old", stored_state.last_ts_s, "v0", np.zeros(SPEC.n_features, np.float32), np.array([0.2, 0.8, 0.0]))
    plan = plan_batch([(rec(0), ev("a"))], {}, {"u1": stored_state}, {"u1": pending}, META, FEATURES, 0.0)
    np.testing.assert_array_equal(plan.features[0], encode([(UserState(), ev("a"))], SPEC, 0.0)[0])
    assert plan.states["u1"] == advance(UserState(), ev("a"))
    assert [(source.event_id, label) for _, source, label, _ in plan.resolutions] == [("old", 0)]  # books


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["books", "music", "garden"])), min_size=2, max_size=25),
       st.data())
def test_features_states_and_labels_do_not_depend_on_batch_boundaries(purchases, data):
    valid = [(rec(i), ev(f"e{i}", user=f"u{user}", category=category, hours=i))
             for i, (user, category) in enumerate(purchases)]
    split = data.draw(st.integers(1, len(valid) - 1))
    whole = plan_batch(valid, {}, {}, {}, META, FEATURES, 0.0)
    first = plan_batch(valid[:split], {}, {}, {}, META, FEATURES, 0.0)
    pendings = {user: served_examples(first, np.full((len(first.fresh), 3), 1 / 3), "v")[i]
                for user, i in first.last_fresh_of_user.items()}
    second = plan_batch(valid[split:], {}, first.states, pendings, META, FEATURES, 0.0)
    np.testing.assert_array_equal(whole.features, np.vstack([first.features, second.features]))
    assert {**first.states, **second.states} == whole.states
    # every purchase but each user's first resolves a label, whichever batch its pending was served in
    labels = [label for _, _, label, _ in first.resolutions + second.resolutions]
    assert labels == [label for _, _, label, _ in whole.resolutions]
    assert len(labels) == len(valid) - len({user for user, _ in purchases})


def test_duplicates_in_batch_and_in_redis_are_dropped():
    claims = {"old": claim("purchases/0/99")}
    valid = [(rec(0), ev("a")), (rec(1), ev("a")), (rec(2), ev("old"))]
    plan = plan_batch(valid, claims, {}, {}, META, FEATURES, 0.0)
    assert [e.event_id for _, e in plan.fresh] == ["a"]
    assert [(r.offset, e.event_id) for r, e in plan.duplicates] == [(1, "a"), (2, "old")]


def test_replayed_record_re_emits_its_prediction_without_touching_state():
    first = plan_batch([(rec(7), ev("a"))], {}, {}, {}, META, FEATURES, 0.0)
    [body], [stored] = make_predictions(first.fresh, np.array([[0.2, 0.7, 0.1]], np.float32), META, "v1", T0)
    state = UserState(purchases=3)
    plan = plan_batch([(rec(7), ev("a"))], {"a": EventClaim.decode(stored.encode())}, {"u1": state}, {}, META, FEATURES, 0.0)
    assert plan.replays == [(rec(7), ev("a"), body)] and plan.fresh == [] and plan.states == {}
    assert plan.features.shape == (0, SPEC.n_features)


@given(st.lists(st.lists(st.floats(0, 1, width=32), min_size=3, max_size=3), min_size=1, max_size=20),
       st.sampled_from(["next_category", "repurchase"]),
       st.datetimes(timezones=st.just(timezone.utc)) | st.datetimes(timezones=st.just(timezone(timedelta(hours=-3)))))
def test_a_replay_writes_the_first_predictions_bytes(rows, task, predicted_at):
    meta = META if task == "next_category" else ModelMeta(task="repurchase", classes=("0", "1"), feature_spec=SPEC,
                                                          horizon_days=7, sha256="0" * 64, extra={},
                       features=FeaturesUsed.built_in(SPEC))
    probabilities = np.array(rows, np.float32)[:, :len(meta.classes)]
    fresh = [(rec(i), ev(f"e{i}", user=f"u{i}", hours=i)) for i in range(len(rows))]
    bodies, claims = make_predictions(fresh, probabilities, meta, "v1-\"quoted\"", predicted_at)
    for (_, event), body, claim in zip(fresh, bodies, claims):
        assert replayed_prediction(EventClaim.decode(claim.encode()), event, meta) == body


def test_multiclass_predictions_carry_top_classes():
    fresh = [(rec(0), ev("a")), (rec(1), ev("b"))]
    probabilities = np.array([[0.2, 0.7, 0.1], [0.5, 0.2, 0.3]], dtype=np.float32)
    p = [Prediction.model_validate_json(m) for m in make_predictions(fresh, probabilities, META, "v1", T0)[0]]
    assert [(x.label, round(x.score, 3)) for x in p] == [("music", 0.7), ("books", 0.5)]
    assert [c.label for c in p[1].probabilities] == ["books", "<other>", "music"]
    assert p[0].event_ts == T0 and p[0].model_version == "v1" and p[0].task == "next_category"


def test_binary_predictions_score_is_probability_of_positive():
    meta = ModelMeta(task="repurchase", classes=("0", "1"), feature_spec=SPEC, horizon_days=7, sha256="0" * 64, extra={},
                       features=FeaturesUsed.built_in(SPEC))
    p = Prediction.model_validate_json(make_predictions([(rec(0), ev("a"))], np.array([[0.3, 0.7]]), meta, "v1", T0)[0][0])
    assert (p.label, p.score, p.probabilities) == ("1", pytest.approx(0.7), None)


def test_predictions_stay_valid_when_the_model_outputs_nan_or_rounding_overshoots():
    probabilities = np.array([[np.nan, 1.0000001, 0.0]], dtype=np.float32)
    p = Prediction.model_validate_json(make_predictions([(rec(0), ev("a"))], probabilities, META, "v1", T0)[0][0])
    assert (p.label, p.score) == ("music", 1.0)


@pytest.mark.parametrize("value, encoding, payload", [
    (b'{"bad": 1}', "utf-8", '{"bad": 1}'),
    (b"\xff\x00", "base64", "/wA="),
    (None, "utf-8", None),
])
def test_dead_letter_keeps_payload_key_and_coordinates(value, encoding, payload):
    topic, key, raw = dead_letter_message(rec(41, partition=3, value=value), Rejection(RejectReason.INVALID_JSON, "why"),
                                          T0, "purchases.dlq", 4096)
    letter = DeadLetter.model_validate_json(raw)
    assert (topic, key) == ("purchases.dlq", b"u")
    assert (letter.payload, letter.payload_encoding, letter.reason, letter.detail) == (payload, encoding, RejectReason.INVALID_JSON, "why")
    assert (letter.topic, letter.partition, letter.offset) == ("purchases", 3, 41)
    assert not letter.payload_truncated and not letter.key_truncated


@pytest.mark.parametrize("key, value", [
    (b"k" * 700_000, b"\x01" * 300_000),  # control characters: six bytes each in JSON
    (b"u", "\u00e9\U0001f600".encode() * 100_000),  # two and four bytes each
    (None, b"\xff" * 100_000),  # base64
    (b"u", b"x" * 4095),
])
@pytest.mark.parametrize("max_bytes", [4096, 65_536, 1_048_064])
def test_a_dead_letter_always_fits_its_bound_and_says_what_it_cut(key, value, max_bytes):
    _, cut_key, raw = dead_letter_message(rec(7, key=key, value=value), Rejection(RejectReason.PAYLOAD_TOO_LARGE, "big"),
                                          T0, "purchases.dlq", max_bytes)
    letter = DeadLetter.model_validate_json(raw)
    assert len(cut_key or b"") + len(raw) <= max_bytes
    assert letter.payload_bytes == len(value)
    assert letter.key_truncated == (key is not None and len(key) > 1024)
    assert cut_key == (key[:1024] if key is not None else None)
    original = value.decode() if letter.payload_encoding == "utf-8" else base64.b64encode(value).decode()
    assert original.startswith(letter.payload)
    assert letter.payload_truncated == (letter.payload != original)
    # what is cut is no more than needed: one character more would not have fitted
    if letter.payload_truncated and max_bytes > 4096:
        assert len(cut_key or b"") + len(raw) > max_bytes * 0.9


def test_events_far_behind_their_partitions_newest_are_refused_as_past_timestamps():
    newest = {"purchases/1": (T0 + timedelta(days=400)).timestamp()}
    valid = [(rec(0, 0), ev("a", hours=0)), (rec(1, 0), ev("old", hours=-24 * 366)),  # behind this batch's newest
             (rec(2, 1), ev("b", hours=0)),  # behind what an earlier batch saw on partition 1
             (rec(3, 0), ev("c", hours=-24 * 365 + 1))]
    kept, stale = split_stale(valid, newest, 365 * 86400)
    assert [e.event_id for _, e in kept] == ["a", "c"]
    assert [(r.offset, rejection.reason) for r, rejection in stale] == [(1, RejectReason.PAST_TIMESTAMP),
                                                                        (2, RejectReason.PAST_TIMESTAMP)]
    assert "purchases/1" in stale[1][1].detail
    assert newest == {"purchases/0": T0.timestamp(), "purchases/1": (T0 + timedelta(days=400)).timestamp()}


def test_next_offsets_is_one_past_the_last_record_per_partition_and_first_offsets_the_first():
    records = [rec(5, 0), rec(9, 1), rec(6, 0), rec(10, 1)]
    assert next_offsets(records) == {("purchases", 0): 7, ("purchases", 1): 11}
    assert first_offsets(records) == {("purchases", 0): 5, ("purchases", 1): 9}


def test_newest_event_times_are_per_input_partition_whatever_the_order():
    fresh = [(rec(5, 0), ev("a", hours=2)), (rec(6, 0), ev("b", hours=1)), (rec(9, 1), ev("c", hours=0))]
    assert newest_event_times(fresh) == {"purchases/0": fresh[0][1].ts_s, "purchases/1": fresh[2][1].ts_s}


REPURCHASE = ModelMeta(task="repurchase", classes=("0", "1"), feature_spec=SPEC, horizon_days=7.0, sha256="0" * 64, extra={},
                       features=FeaturesUsed.built_in(SPEC))


def test_each_purchase_resolves_the_users_previous_prediction():
    stored = Example("old", T0.timestamp() - 3600, "v0", np.zeros(SPEC.n_features, np.float32), np.array([0.5, 0.5, 0.0]))
    valid = [(rec(0), ev("a", category="music")), (rec(1), ev("b", user="u2")), (rec(2), ev("c", category="books", hours=1))]
    plan = plan_batch(valid, {}, {}, {"u1": stored}, META, FEATURES, 0.0)
    probabilities = np.full((3, 3), 1 / 3, dtype=np.float32)
    served = served_examples(plan, probabilities, "v1")
    resolved = resolved_examples(plan, served)
    # u1's stored prediction is resolved by "a" (music); "a" is resolved by "c" (books); u2 has nothing pending
    assert [(user, e.event_id, e.label, e.model_version) for user, e in resolved] == [("u1", "old", 1, "v0"), ("u1", "a", 0, "v1")]
    # each label became known with the purchase that resolved it
    assert [e.resolved_ts_s for _, e in resolved] == [plan.fresh[0][1].ts_s, plan.fresh[2][1].ts_s]
    assert all(e.resolved_ts_s is None for e in served)  # pending: no label yet
    assert plan.last_fresh_of_user == {"u1": 2, "u2": 1}


@pytest.mark.parametrize("gap_hours, label", [(24, 1), (24 * 8, 0)])
def test_repurchase_resolution_on_purchase(gap_hours, label):
    pending = Example("p", T0.timestamp(), "v0", np.zeros(SPEC.n_features, np.float32), np.array([0.4, 0.6]))
    plan = plan_batch([(rec(0), ev("a", hours=gap_hours))], {}, {}, {"u1": pending}, REPURCHASE, FEATURES, 0.0)
    assert plan.resolutions == [("u1", pending, label, plan.fresh[0][1].ts_s)]


def test_replays_and_duplicates_resolve_nothing():
    pending = Example("p", T0.timestamp(), "v0", np.zeros(SPEC.n_features, np.float32), np.array([0.4, 0.6]))
    claims = {"a": claim("purchases/0/0"), "b": claim("purchases/0/99")}
    plan = plan_batch([(rec(0), ev("a")), (rec(1), ev("b"))], claims, {}, {"u1": pending}, REPURCHASE, FEATURES, 0.0)
    assert plan.resolutions == [] and plan.last_fresh_of_user == {}


def test_expire_pendings_by_watermark():
    def pending(day):
        return Example(f"p{day}", day * 86400.0, "v0", np.zeros(2, np.float32), np.array([0.5, 0.5]))

    due = {"old": pending(0), "fresh": pending(9), "bought": pending(0)}
    negatives, cleared, requeue = expire_pendings(due, watermark_s=10 * 86400.0, horizon_days=7.0, replaced={"bought"})
    assert [(user, e.event_id, e.label, e.resolved_ts_s) for user, e in negatives] == [("old", "p0", 0, 10 * 86400.0)]  # known at the watermark
    assert cleared == ["old"] and requeue == {"fresh": 16 * 86400.0}


def test_the_first_batch_dates_history_from_its_oldest_event_but_not_from_a_stale_one():
    events = [ev(f"e{i}", hours=i) for i in range(10)]
    assert first_event_time(events) == events[0].ts_s
    stale = ev("stale", hours=-24 * 60)  # two months before the rest
    assert first_event_time([stale] + events) == events[0].ts_s
    assert first_event_time([ev("a", hours=-24 * 20)] + events) == ev("a", hours=-24 * 20).ts_s  # within the span
    assert first_event_time([]) == 0.0
