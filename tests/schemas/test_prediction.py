"""The hot path writes prediction JSON by hand; it must mean exactly what the pydantic model means."""
from datetime import datetime, timedelta, timezone

from hypothesis import given, strategies as st

from schemas import ClassProbability, Prediction
from schemas.prediction import iso_datetime, prediction_json

text = st.text(min_size=1, max_size=40)  # any unicode, quotes, backslashes and control characters included
probability = st.floats(min_value=0.0, max_value=1.0)
moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)),
                                                  timezone(timedelta(hours=-8))]))


@given(event_id=text, user_id=text, model_version=text, label=text, score=probability,
       ranked=st.none() | st.lists(st.tuples(text, probability), min_size=1, max_size=3),
       task=st.sampled_from(["next_category", "repurchase"]), event_ts=moments, predicted_at=moments)
def test_hand_written_json_equals_the_models_meaning(event_id, user_id, model_version, label, score, ranked, task,
                                                     event_ts, predicted_at):
    expected = Prediction(event_id=event_id, user_id=user_id, task=task, model_version=model_version, label=label,
                          score=score, event_ts=event_ts, predicted_at=predicted_at,
                          probabilities=None if ranked is None else [ClassProbability(label=n, probability=p)
                                                                     for n, p in ranked])
    written = prediction_json(event_id=event_id, user_id=user_id, task=task, model_version=model_version, label=label,
                              score=score, probabilities=ranked, event_ts=iso_datetime(event_ts),
                              predicted_at=iso_datetime(predicted_at))
    assert Prediction.model_validate_json(written) == expected


def test_utc_is_written_as_z_like_pydantic_writes_it():
    moment = datetime(2026, 3, 2, 9, 0, 1, 500, tzinfo=timezone.utc)
    assert iso_datetime(moment) == "2026-03-02T09:00:01.000500Z"
    assert Prediction(event_id="e", user_id="u", task="repurchase", model_version="v", label="1", score=0.5,
                      event_ts=moment, predicted_at=moment).model_dump_json().count(iso_datetime(moment)) == 2
