"""A model version on the `model-versions` topic, keyed by model name."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainedOn(BaseModel):
    model_config = ConfigDict(frozen=True)

    examples: int = Field(ge=0)
    event_time_from: datetime | None = None
    event_time_to: datetime | None = None


class ModelVersion(BaseModel):
    """Every trained model, promoted or not, with its lineage and the scores that decided it."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    model: str
    version: str
    parent_version: str | None = None
    task: Literal["next_category", "repurchase"]
    source_checkpoint_sha256: str
    created_at: datetime
    trained_on: TrainedOn
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="{'candidate': {...}, 'champion': {...}} on the same holdout"
    )
    promoted: bool
    strategy: str | None = Field(default=None, description="fine-tune strategy; None for the source checkpoint")
    decision: str | None = Field(default=None, description="why the gate promoted or rejected it")
    artifact_sha256: str
    artifact_ref: str = Field(description="where the artifact is stored, e.g. a Redis key")
