"""A served prediction on the `predictions` topic, keyed by user_id."""
from __future__ import annotations

from datetime import datetime
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
