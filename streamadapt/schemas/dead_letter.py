"""A rejected input record on the `purchases.dlq` topic."""
from __future__ import annotations

import base64
from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RejectReason(str, Enum):
    """Machine-readable reasons; the `detail` field says which field and why in words."""

    EMPTY_PAYLOAD = "empty_payload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    NON_FINITE_NUMBER = "non_finite_number"
    INVALID_TIMESTAMP = "invalid_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"
    PAST_TIMESTAMP = "past_timestamp"
    FIELD_TOO_LONG = "field_too_long"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"


class DeadLetter(BaseModel):
    """The original payload, why it was refused, and where it came from."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    payload: str | None = Field(description="the original bytes: UTF-8 text, or base64 when not valid UTF-8")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    payload_bytes: int = Field(ge=0, description="size of the original payload")
    payload_truncated: bool = Field(False, description="the payload is only the start of the original: a dead "
                                                       "letter must fit the topic's record size limit")
    key_truncated: bool = Field(False, description="the record's key is only the start of the input record's key")
    reason: RejectReason
    detail: str
    topic: str
    partition: int
    offset: int
    failed_at: datetime

    @staticmethod
    def encode_payload(raw: bytes | None) -> tuple[str | None, str]:
        """Text when the bytes are UTF-8, else base64."""
        if raw is None:
            return None, "utf-8"
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii"), "base64"
