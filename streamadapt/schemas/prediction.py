"""A served prediction on the `predictions` topic, keyed by user_id."""
from __future__ import annotations

from datetime import datetime
from json.encoder import (
    encode_basestring as _json_string,  # the C encoder when available
)
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ClassProbability(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    probability: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    """One prediction for one valid event. A replay of the same input record yields the same message."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    event_id: str
    user_id: str
    task: Literal["next_category", "repurchase"]
    model_version: str
    label: str = Field(description="predicted class")
    score: float = Field(ge=0, le=1, description="P(positive) for binary tasks, P(label) for multiclass")
    probabilities: list[ClassProbability] | None = Field(
        default=None, description="top classes, most probable first (multiclass only)"
    )
    event_ts: datetime
    predicted_at: datetime


class PredictionWriter:
    """Writes the JSON of Predictions without building pydantic objects: the serving path writes one per
    event, and validating and dumping a model took five times as long. What is the same for a whole batch
    (task, model version, class names, prediction time) is escaped once, here.

    Callers pass values that already satisfy the schema: probabilities finite and within [0, 1].
    tests/schemas/test_prediction.py checks that every result validates as the Prediction built from
    the same values.
    """

    def __init__(self, *, task: str, model_version: str, classes: tuple[str, ...], predicted_at: datetime):
        self._classes = classes
        self._labels = [_json_string(name) for name in classes]
        self._ranked = [f'{{"label":{label},"probability":' for label in self._labels]
        self._middle = f'"task":{_json_string(task)},"model_version":{_json_string(model_version)},"label":'
        self._tail = f'","predicted_at":"{iso_datetime(predicted_at)}"}}'

    def __call__(self, event_id: str, user_id: str, event_ts: datetime, label: int, score: float,
                 ranked: list[tuple[int, float]] | None = None) -> bytes:
        """`label` and the first of each `ranked` pair index the classes; `ranked` is None for binary tasks."""
        if ranked is None:
            top = "null"
        elif len(ranked) == 3:  # what the worker serves: one format instead of a join over a generator
            (j0, p0), (j1, p1), (j2, p2) = ranked
            r = self._ranked
            top = f"[{r[j0]}{p0!r}}},{r[j1]}{p1!r}}},{r[j2]}{p2!r}}}]"
        else:
            top = "[" + ",".join(f"{self._ranked[j]}{p!r}}}" for j, p in ranked) + "]"
        return (f'{{"schema_version":1,"event_id":{_json_string(event_id)},"user_id":{_json_string(user_id)},'
                f'{self._middle}{self._labels[label]},"score":{score!r},"probabilities":{top},'
                f'"event_ts":"{iso_datetime(event_ts)}{self._tail}').encode()


def iso_datetime(value: datetime) -> str:
    """ISO 8601 as pydantic writes it: UTC as `Z`, other offsets kept."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
