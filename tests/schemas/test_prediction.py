"""The hot path writes prediction JSON by hand; it must mean exactly what the pydantic model means."""
from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from streamadapt.schemas import ClassProbability, Prediction
from streamadapt.schemas.prediction import PredictionWriter, iso_datetime

text = st.text(min_size=1, max_size=40)  # any unicode, quotes, backslashes and control characters included
probability = st.floats(min_value=0.0, max_value=1.0)
moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)),
                                                  timezone(timedelta(hours=-8))]))


@given(event_id=text, user_id=text, model_version=text, classes=st.lists(text, min_size=2, max_size=6, unique=True),
       data=st.data(), task=st.sampled_from(["next_category", "repurchase"]), event_ts=moments, predicted_at=moments)
def test_hand_written_json_equals_the_models_meaning(event_id, user_id, model_version, classes, data, task, event_ts,
                                                     predicted_at):
    label = data.draw(st.integers(0, len(classes) - 1))
    score = data.draw(probability)
    ranked = data.draw(st.none() | st.lists(st.tuples(st.integers(0, len(classes) - 1), probability),
                                            min_size=1, max_size=3))
    expected = Prediction(event_id=event_id, user_id=user_id, task=task, model_version=model_version,
                          label=classes[label], score=score, event_ts=event_ts, predicted_at=predicted_at,
                          probabilities=None if ranked is None else [ClassProbability(label=classes[j], probability=p)
                                                                     for j, p in ranked])
    write = PredictionWriter(task=task, model_version=model_version, classes=tuple(classes), predicted_at=predicted_at)
    assert Prediction.model_validate_json(write(event_id, user_id, event_ts, label, score, ranked)) == expected


def test_utc_is_written_as_z_like_pydantic_writes_it():
    moment = datetime(2026, 3, 2, 9, 0, 1, 500, tzinfo=timezone.utc)
    assert iso_datetime(moment) == "2026-03-02T09:00:01.000500Z"
    assert Prediction(event_id="e", user_id="u", task="repurchase", model_version="v", label="1", score=0.5,
                      event_ts=moment, predicted_at=moment).model_dump_json().count(iso_datetime(moment)) == 2
