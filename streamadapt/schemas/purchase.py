"""The input event on the `purchases` topic (its JSON Schema: streamadapt/schemas/json/purchase_event.json)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MAX_QUANTITY = 2**31 - 1  # keeps every derived float finite; no real basket comes near it

Identifier = Annotated[str, Field(strict=True, min_length=1, max_length=128)]
# item_id and category: the worker's limits are settings (--max-item-id-chars, --max-category-chars), at most this
FREE_TEXT_MAX_CHARS = 4096
FreeText = Annotated[str, Field(strict=True, min_length=1, max_length=FREE_TEXT_MAX_CHARS)]
ShortText = Annotated[str, Field(strict=True, max_length=128)]
# Event time starts at the Unix epoch: every later conversion (to epoch seconds, back to a datetime, into a
# Kafka timestamp) is then total. How far behind the stream an event may be is a setting (--max-past-skew-s).
EARLIEST_TS = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EARLIEST_NAIVE = EARLIEST_TS.replace(tzinfo=None)


class _EpochSeconds:
    """`event.ts_s`: the event time in epoch seconds, computed on the first read and kept in the event's
    `__dict__`, where later reads find it without calling this (it defines no `__set__`, so the instance's
    value wins). Copies drop it (`PurchaseEvent.__copy__`), so `model_copy(update={"ts": ...})` never reads
    a stale time. (functools.cached_property would do, but on Python 3.11 it takes a lock on every first
    read.)"""

    def __get__(self, event: PurchaseEvent | None, owner: type | None = None) -> float:
        if event is None:
            return self  # type: ignore[return-value]
        ts_s = event.__dict__["ts_s"] = event.ts.timestamp()
        return ts_s


class PurchaseEvent(BaseModel):
    """One purchase. The worker validates with `streamadapt.core.parsing.parse_event`, which also refuses events
    too far ahead of its clock (a rule about the worker's clock, not about the payload alone). Fields beyond
    these are kept, unvalidated, in `model_extra`: the built-in features ignore them, a feature plug-in may
    read them."""

    model_config = ConfigDict(extra="allow", frozen=True, ignored_types=(_EpochSeconds,))

    event_id: Identifier
    user_id: Identifier
    item_id: FreeText
    category: FreeText = "unknown"
    price: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False, description="unit price")]
    quantity: Annotated[int, Field(strict=True, ge=1, le=MAX_QUANTITY)]
    currency: Annotated[str, Field(strict=True, pattern=r"^[A-Z]{3}$", description="ISO 4217 code")] = "USD"
    ts: Annotated[AwareDatetime, Field(description="event time, ISO 8601 with a time zone")]
    country: ShortText | None = None
    channel: ShortText | None = None
    session_id: ShortText | None = None
    schema_version: Annotated[int, Field(strict=True)] = 1

    ts_s = _EpochSeconds()  # ts in epoch seconds, read several times per event by the serving path

    def __copy__(self) -> PurchaseEvent:
        copied = super().__copy__()
        copied.__dict__.pop("ts_s", None)  # the copy may get another ts
        return copied

    def __deepcopy__(self, memo: dict | None = None) -> PurchaseEvent:
        copied = super().__deepcopy__(memo)
        copied.__dict__.pop("ts_s", None)
        return copied

    @field_validator("category", "currency", mode="before")
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_is_a_string(cls, value: Any) -> Any:
        # JSON numbers would otherwise pass as Unix times; Python callers may hand in a datetime.
        if isinstance(value, str):
            # The standard library's parser gives a datetime with a standard-library time zone, whose
            # arithmetic is several times cheaper than pydantic's own; pydantic still checks the result
            # (aware, in range) and parses, or refuses, what the standard library does not accept.
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                return value
        if not isinstance(value, datetime):
            raise PydanticCustomError("string_type", "ts must be an ISO 8601 string")
        return value

    @field_validator("ts")
    @classmethod
    def _not_before_the_epoch(cls, value: datetime) -> datetime:
        # Compared without converting: a datetime near year 1 with a positive offset has no UTC equivalent.
        if value.replace(tzinfo=None) < _EARLIEST_NAIVE + (value.utcoffset() or timedelta(0)):
            raise PydanticCustomError("timestamp_before_epoch", "ts is before 1970-01-01T00:00:00Z")
        return value

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value not in SUPPORTED_SCHEMA_VERSIONS:
            raise PydanticCustomError(
                "unsupported_schema_version",
                "schema_version {version} is not supported (supported: {supported})",
                {"version": value, "supported": sorted(SUPPORTED_SCHEMA_VERSIONS)},
            )
        return value
