"""The input event on the `purchases` topic (see DESIGN.md, "Input event")."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MAX_QUANTITY = 2**31 - 1  # keeps every derived float finite; no real basket comes near it

Identifier = Annotated[str, Field(strict=True, min_length=1, max_length=128)]


class PurchaseEvent(BaseModel):
    """One purchase. Validate with `PurchaseEvent.model_validate_json(raw, context=ValidationContext)`.

    The validation context may carry `now` (aware datetime) and `max_future_skew_s`; an event whose `ts`
    lies further than that ahead of `now` is rejected as `future_timestamp`.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Identifier
    user_id: Identifier
    item_id: Annotated[str, Field(strict=True, min_length=1)]
    category: Annotated[str, Field(strict=True, min_length=1)] = "unknown"
    price: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False, description="unit price")]
    quantity: Annotated[int, Field(strict=True, ge=1, le=MAX_QUANTITY)]
    currency: Annotated[str, Field(strict=True, pattern=r"^[A-Z]{3}$", description="ISO 4217 code")] = "USD"
    ts: Annotated[AwareDatetime, Field(description="event time, ISO 8601 with a time zone")]
    country: Annotated[str, Field(strict=True)] | None = None
    channel: Annotated[str, Field(strict=True)] | None = None
    session_id: Annotated[str, Field(strict=True)] | None = None
    schema_version: Annotated[int, Field(strict=True)] = 1

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
        if not isinstance(value, (str, datetime)):
            raise PydanticCustomError("string_type", "ts must be an ISO 8601 string")
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

    @model_validator(mode="after")
    def _not_from_the_future(self, info: ValidationInfo) -> PurchaseEvent:
        context = info.context or {}
        now: datetime | None = context.get("now")
        if now is not None:
            skew = timedelta(seconds=context.get("max_future_skew_s", 3600))
            if self.ts > now + skew:
                raise PydanticCustomError(
                    "future_timestamp",
                    "ts {ts} is more than {skew_s} s ahead of the worker's clock",
                    {"ts": self.ts.isoformat(), "skew_s": int(skew.total_seconds())},
                )
        return self
