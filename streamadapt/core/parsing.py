"""Input record -> PurchaseEvent or Rejection. Pure: the clock and limits are passed in."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from streamadapt.schemas import PurchaseEvent, RejectReason
from streamadapt.schemas.purchase import FREE_TEXT_MAX_CHARS


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The limits a valid record keeps beyond the schema's own (settings: --max-payload-bytes, ...)."""

    max_payload_bytes: int
    max_future_skew_s: float
    max_item_id_chars: int = FREE_TEXT_MAX_CHARS
    max_category_chars: int = FREE_TEXT_MAX_CHARS


# pydantic error type -> our reason. Types not listed fall back by suffix in _reason_for().
_REASONS: dict[str, RejectReason] = {
    "json_invalid": RejectReason.INVALID_JSON,
    "json_type": RejectReason.INVALID_JSON,
    "model_type": RejectReason.NOT_AN_OBJECT,
    "model_attributes_type": RejectReason.NOT_AN_OBJECT,
    "missing": RejectReason.MISSING_FIELD,
    "finite_number": RejectReason.NON_FINITE_NUMBER,
    "unsupported_schema_version": RejectReason.UNSUPPORTED_SCHEMA_VERSION,
    "timezone_aware": RejectReason.INVALID_TIMESTAMP,
    "timestamp_before_epoch": RejectReason.PAST_TIMESTAMP,
    "string_too_long": RejectReason.FIELD_TOO_LONG,
}


def parse_event(raw: bytes | None, *, now: datetime, limits: InputLimits) -> PurchaseEvent | Rejection:
    """Validate one record value against the input contract.

    `now` is the worker's clock (aware datetime); events more than `limits.max_future_skew_s` ahead are
    refused. (How far behind the stream an event may be is judged per partition: plan.split_stale.)
    Never raises for bad input: every way a payload can break the contract comes back as a Rejection.
    """
    if raw is None or len(raw) == 0:
        return Rejection(RejectReason.EMPTY_PAYLOAD, "record has no value")
    if len(raw) > limits.max_payload_bytes:
        return Rejection(RejectReason.PAYLOAD_TOO_LARGE, f"{len(raw)} bytes > limit of {limits.max_payload_bytes}")
    try:
        event = PurchaseEvent.model_validate_json(raw)
    except ValidationError as error:
        return _rejection(error, raw)
    if event.ts_s > now.timestamp() + limits.max_future_skew_s:
        return Rejection(RejectReason.FUTURE_TIMESTAMP, f"ts: {event.ts.isoformat()} is more than "
                         f"{limits.max_future_skew_s:g} s ahead of the worker's clock")
    if len(event.item_id) > limits.max_item_id_chars:
        return Rejection(RejectReason.FIELD_TOO_LONG,
                         f"item_id: {len(event.item_id)} characters > limit of {limits.max_item_id_chars}")
    if len(event.category) > limits.max_category_chars:
        return Rejection(RejectReason.FIELD_TOO_LONG,
                         f"category: {len(event.category)} characters > limit of {limits.max_category_chars}")
    return event


def _rejection(error: ValidationError, raw: bytes) -> Rejection:
    errors = error.errors(include_url=False, include_input=False)
    # A payload of an unknown schema version is judged by its version, not by the fields it lacks.
    first = next((e for e in errors if e["type"] == "unsupported_schema_version"), errors[0])
    reason = _reason_for(first["type"], first["loc"])
    field = ".".join(str(part) for part in first["loc"])
    detail = f"{field}: {first['msg']}" if field else first["msg"]
    if reason is RejectReason.INVALID_JSON and not _is_utf8(raw):
        detail = "payload is not valid UTF-8"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return Rejection(reason, detail)


def _reason_for(error_type: str, loc: tuple) -> RejectReason:
    if error_type in _REASONS:
        return _REASONS[error_type]
    if loc and loc[0] == "ts":
        return RejectReason.WRONG_TYPE if error_type == "string_type" else RejectReason.INVALID_TIMESTAMP
    if error_type.endswith("_type") or error_type.endswith("_parsing"):
        return RejectReason.WRONG_TYPE
    return RejectReason.INVALID_VALUE


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
